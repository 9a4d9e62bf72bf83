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
    pub fn start(stack: &Stack, ports: &[u16]) -> Watch {
        let mut w = Watch::start_requests(ports);
        {
            let (stop, failures, ports) = (w.stop.clone(), w.failures.clone(), ports.to_vec());
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
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, ok, failures, ports) =
                (stop.clone(), ok.clone(), failures.clone(), ports.to_vec());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for port in &ports {
                        match http_get(SocketAddr::from(([127, 0, 0, 1], *port)), "/") {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures
                                .lock()
                                .unwrap()
                                .push(format!("port {port}: {other:?}")),
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

    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}
