//! A client that requests every given port in a loop and counts failures,
//! optionally while a second thread checks that Envoy never loses their
//! listeners.

use super::{http_get, Stack};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Requests every port in a loop and counts failures, while another thread
/// checks that Envoy never loses a listener.
pub struct Watch {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Requests every port on loopback, and watches Envoy's listeners.
    pub fn start(stack: &Stack, ports: &[u16]) -> Watch {
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        Watch::start_at(stack, &addrs)
    }

    /// The same at the given addresses (an outside client's, say).
    pub fn start_at(stack: &Stack, addrs: &[SocketAddr]) -> Watch {
        let mut w = Watch::start_requests_at(addrs);
        {
            let ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
            let (stop, failures) = (w.stop.clone(), w.failures.clone());
            let admin = stack.admin;
            w.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let listeners = super::admin_get(admin, "/listeners");
                    for port in &ports {
                        let suffix = format!(":{port}");
                        if !listeners.lines().any(|l| l.trim_end().ends_with(&suffix)) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("listener for {port} missing"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            }));
        }
        w
    }

    /// Only the request loop, for times when Envoy may rightly lack the
    /// listeners (the proxies relay).
    pub fn start_requests(ports: &[u16]) -> Watch {
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        Watch::start_requests_at(&addrs)
    }

    pub fn start_requests_at(addrs: &[SocketAddr]) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, ok, failures, addrs) =
                (stop.clone(), ok.clone(), failures.clone(), addrs.to_vec());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for addr in &addrs {
                        match http_get(*addr, "/") {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.lock().unwrap().push(format!("{addr}: {other:?}")),
                        }
                    }
                }
            }));
        }
        Watch {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Waits until `n` more requests have succeeded: the loop has run
    /// through whatever happens meanwhile. Panics after 60 s, loudly, with
    /// the failures so far.
    pub fn wait_served(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let reached = super::wait_until(Duration::from_secs(60), || {
            self.ok.load(Ordering::Relaxed) >= target
        });
        assert!(
            reached,
            "the request loop never got {n} more answers; failures: {:?}",
            self.failures.lock().unwrap()
        );
    }

    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}
