//! The two relay threads: host to containers (`inbound`) and containers to
//! host (`outbound`, which also forgets idle clients).

use super::clients::{Client, Shared};
use super::pace::Pace;
use super::recv::{Receiver, BATCH};
use super::send::{Gso, Sender};
use crate::proxy::say::say;
use nix::libc;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Ready upstream sockets taken per `epoll_wait`.
pub(super) const EVENTS: usize = 64;

/// Host to containers: one thread, blocked in recvmmsg on the host socket.
pub(super) fn inbound(shared: Arc<Shared>) {
    let host = shared.host.as_raw_fd();
    let mut rx = Receiver::new();
    let mut tx = Sender::new(Gso::probe(&shared.host));
    let mut targets: Vec<Option<Arc<Client>>> = Vec::with_capacity(BATCH);
    let mut said_full = false;
    let mut pace = Pace::new(shared.spin);
    loop {
        let spin = pace.spin();
        let flags = if spin {
            libc::MSG_DONTWAIT
        } else {
            libc::MSG_WAITFORONE
        };
        let n = match rx.recv(host, flags) {
            Ok(n) => n,
            Err(e) => {
                if spin && e.kind() == io::ErrorKind::WouldBlock {
                    pace.nothing();
                    continue;
                }
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::debug!("udp receive: {e}");
                    // Not a loop on a socket that keeps failing.
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
        };
        pace.arrived();
        // Find (or make) every datagram's client under one lock, and mark
        // them busy there, so a sweep cannot forget one in between.
        let now = shared.now();
        {
            let mut table = shared.table();
            let mut prev: Option<(SocketAddr, Arc<Client>)> = None;
            for i in 0..n {
                let Some(from) = rx.source(i) else {
                    targets.push(None);
                    continue;
                };
                if let Some((addr, c)) = &prev {
                    if *addr == from {
                        targets.push(Some(c.clone()));
                        continue;
                    }
                }
                match shared.client(&mut table, from) {
                    Ok(c) => {
                        c.last.store(now, Ordering::Relaxed);
                        targets.push(Some(c.clone()));
                        prev = Some((from, c));
                    }
                    Err(e) => {
                        // Said once: a flood of new sources would flood the log.
                        if !std::mem::replace(&mut said_full, true) {
                            say(&format!("udp: no upstream socket for {from}: {e}"));
                        }
                        targets.push(None);
                    }
                }
            }
        }
        // One send call per run of datagrams from the same client.
        let mut i = 0;
        while i < n {
            let Some(c) = targets[i].clone() else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < n && targets[j].as_ref().is_some_and(|d| Arc::ptr_eq(&c, d)) {
                j += 1;
            }
            tx.relay(&rx, i..j, c.upstream.as_raw_fd(), None);
            i = j;
        }
        targets.clear();
        pace.done();
    }
}

/// Containers to host: one thread, blocked in epoll_wait on every upstream
/// socket; it also forgets idle clients.
pub(super) fn outbound(shared: Arc<Shared>) {
    let host = shared.host.as_raw_fd();
    let mut rx = Receiver::new();
    let mut tx = Sender::new(Gso::probe(&shared.host));
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut ready: Vec<Arc<Client>> = Vec::with_capacity(EVENTS);
    let mut next_sweep = shared.now() + shared.idle_ms;
    let mut pace = Pace::new(shared.spin);
    loop {
        let wait = if pace.spin() {
            0
        } else {
            next_sweep.saturating_sub(shared.now()).min(i32::MAX as u64) as i32
        };
        // SAFETY: `events` is a writable array of EVENTS entries.
        let n = unsafe {
            libc::epoll_wait(
                shared.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as i32,
                wait,
            )
        };
        if n > 0 {
            pace.arrived();
            {
                let table = shared.table();
                for ev in &events[..n as usize] {
                    let token = ev.u64;
                    if let Some(c) = table.by_token.get(&token) {
                        ready.push(c.clone());
                    }
                }
            }
            for c in ready.drain(..) {
                match rx.recv(c.upstream.as_raw_fd(), libc::MSG_DONTWAIT) {
                    Ok(got) => {
                        c.last.store(shared.now(), Ordering::Relaxed);
                        tx.relay(&rx, 0..got, host, Some(&c.dest));
                    }
                    // ICMP port unreachable from the container: ignored, as
                    // docker-proxy does, until the client goes idle.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused
                                | io::ErrorKind::WouldBlock
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        tracing::debug!("udp upstream {}: {e}", shared.backend);
                        shared.forget(&mut shared.table(), &c);
                    }
                }
            }
            pace.done();
        } else if n == 0 && wait == 0 {
            pace.nothing();
        } else if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::debug!("udp epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let now = shared.now();
        if now >= next_sweep {
            next_sweep = shared.sweep(now);
        }
    }
}
