//! The clients being relayed, and what both relay threads share: the host
//! socket, the backend, the epoll set of upstream sockets, and the table
//! of clients by address and by token, which the threads lock briefly.

use nix::libc;
use nix::sys::socket::{setsockopt, sockopt, SockaddrStorage};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Client addresses relayed at once, each with its own upstream socket.
pub const MAX_CLIENTS: usize = 4096;

/// What both relay threads share.
pub(super) struct Shared {
    pub(super) host: StdUdpSocket,
    pub(super) backend: SocketAddr,
    /// Every client's upstream socket, with the client's token as data.
    pub(super) epoll: OwnedFd,
    pub(super) table: Mutex<Table>,
    pub(super) epoch: Instant,
    pub(super) idle_ms: u64,
    /// How long to spin; see [`Pace`].
    pub(super) spin: Duration,
}

/// The clients being relayed, by address (for the inbound thread) and by
/// token (for the outbound one, which gets tokens from epoll).
#[derive(Default)]
pub(super) struct Table {
    pub(super) by_addr: HashMap<SocketAddr, Arc<Client>>,
    pub(super) by_token: HashMap<u64, Arc<Client>>,
    pub(super) next_token: u64,
}

pub(super) struct Client {
    /// Connected to the backend.
    pub(super) upstream: StdUdpSocket,
    pub(super) addr: SocketAddr,
    /// Where replies go, as the kernel takes it.
    pub(super) dest: SockaddrStorage,
    pub(super) token: u64,
    /// Milliseconds since `Shared::epoch` of the last datagram either way.
    pub(super) last: AtomicU64,
}

impl Shared {
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means a thread died holding it; the table
        // itself is still consistent enough to relay with.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client `from`, made with its upstream socket on its first
    /// datagram. Called with the table locked.
    pub(super) fn client(&self, table: &mut Table, from: SocketAddr) -> io::Result<Arc<Client>> {
        if let Some(c) = table.by_addr.get(&from) {
            return Ok(c.clone());
        }
        if table.by_addr.len() >= MAX_CLIENTS {
            return Err(io::Error::other(format!(
                "{MAX_CLIENTS} clients are being relayed already"
            )));
        }
        let local: SocketAddr = if self.backend.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let upstream = StdUdpSocket::bind(local)?;
        upstream.connect(self.backend)?;
        let _ = setsockopt(&upstream, sockopt::UdpGroSegment, &true);
        let token = table.next_token;
        table.next_token += 1;
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open for this call, and `event` is a
        // valid epoll_event that the kernel only reads.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                upstream.as_raw_fd(),
                &mut event,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let client = Arc::new(Client {
            upstream,
            addr: from,
            dest: SockaddrStorage::from(from),
            token,
            last: AtomicU64::new(self.now()),
        });
        table.by_addr.insert(from, client.clone());
        table.by_token.insert(token, client.clone());
        Ok(client)
    }

    /// Forgets a client; its socket closes once no thread holds it.
    pub(super) fn forget(&self, table: &mut Table, c: &Client) {
        table.by_token.remove(&c.token);
        if table
            .by_addr
            .get(&c.addr)
            .is_some_and(|v| v.token == c.token)
        {
            table.by_addr.remove(&c.addr);
        }
        // SAFETY: both descriptors are open; DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                c.upstream.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Forgets every client idle for the timeout; returns when the next
    /// one could expire at the earliest.
    pub(super) fn sweep(&self, now: u64) -> u64 {
        let mut table = self.table();
        let mut next = now + self.idle_ms;
        let expired: Vec<Arc<Client>> = table
            .by_token
            .values()
            .filter(|c| {
                let due = c.last.load(Ordering::Relaxed) + self.idle_ms;
                if due > now {
                    next = next.min(due);
                }
                due <= now
            })
            .cloned()
            .collect();
        for c in expired {
            self.forget(&mut table, &c);
        }
        // A client made after this sweep expires later than `now + idle`.
        next
    }
}
