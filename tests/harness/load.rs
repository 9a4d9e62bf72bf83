//! A client that opens a new TCP connection per request in a tight loop
//! (an HTTP GET with `Connection: close`) and records each outcome with
//! its time, so a test can count failures inside chosen time windows.

use super::http_get;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request: when it started and ended, and the failure if it failed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub at: Instant,
    pub end: Instant,
    pub error: Option<String>,
}

pub struct ConnectLoop {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectLoop {
    /// Starts the loop against `addr`; every answer must be `200 body`.
    pub fn start(addr: SocketAddr, body: &str) -> ConnectLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l, body) = (stop.clone(), log.clone(), body.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let error = match http_get(addr, "/") {
                    Ok((200, b)) if b == body => None,
                    other => Some(format!("{other:?}")),
                };
                let end = Instant::now();
                l.lock().unwrap().push(Outcome { at, end, error });
            }
        });
        ConnectLoop {
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until at least `n` more requests have been made since the call.
    pub fn run_for(&self, n: usize, limit: Duration) {
        let target = self.count() + n;
        assert!(
            super::wait_until(limit, || self.count() >= target),
            "the connect loop made only {} of {target} requests in {limit:?}",
            self.count()
        );
    }

    /// Waits until a request that started after `since` has succeeded.
    pub fn wait_for_success_after(&self, since: Instant, limit: Duration) -> bool {
        super::wait_until(limit, || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .any(|o| o.at >= since && o.error.is_none())
        })
    }

    /// Stops the loop and returns every outcome.
    pub fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The failures among `log` that began and ended within `[from, to)`, so
/// that a request in flight at `to` is not counted. Each is given with its
/// start, counted from the first request.
pub fn failures_between(log: &[Outcome], from: Instant, to: Instant) -> Vec<String> {
    let Some(origin) = log.first().map(|o| o.at) else {
        return Vec::new();
    };
    log.iter()
        .filter(|o| o.at >= from && o.end < to)
        .filter_map(|o| {
            let e = o.error.as_ref()?;
            Some(format!("at {:?}: {e}", o.at.duration_since(origin)))
        })
        .collect()
}

/// From the first failure to the end of the last one, within `[from, to)`;
/// zero if none failed.
pub fn failure_window(log: &[Outcome], from: Instant, to: Instant) -> Duration {
    let inside: Vec<&Outcome> = log.iter().filter(|o| o.at >= from && o.at < to).collect();
    let first = inside.iter().position(|o| o.error.is_some());
    let last = inside.iter().rposition(|o| o.error.is_some());
    match (first, last) {
        (Some(f), Some(l)) => {
            let end = inside.get(l + 1).map(|o| o.at).unwrap_or(inside[l].at);
            end.duration_since(inside[f].at)
        }
        _ => Duration::ZERO,
    }
}
