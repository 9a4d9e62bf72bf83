//! The in-process UDP relay, with docker-proxy's semantics: one upstream
//! socket per client address, forgotten after 90 s without traffic in
//! either direction, datagrams up to 65507 bytes, and ECONNREFUSED from the
//! container ignored. At most [`MAX_CLIENTS`] client addresses are relayed
//! at once: datagrams from further new addresses are dropped (and said
//! once) until one goes idle, so spoofed sources cannot use up the proxy's
//! descriptors.
//!
//! How it relays, and why (numbers from bench/udp.py; see `Pace`):
//! - Two threads of its own carry the datagrams; the proxy's tokio runtime
//!   never sees one. That saves a runtime turn on each side (epoll, task
//!   wake-up, poll, and a last try that ends in EAGAIN):
//!   - inbound: `recvmmsg` on the host socket, up to `BATCH` datagrams a
//!     call but back as soon as one is there; then, per client, one
//!     `sendmmsg` on its upstream socket (connected to the container).
//!   - outbound: `epoll_wait` over every upstream socket; `recvmmsg` on
//!     each ready one, then one `sendmmsg` to that client from the host
//!     socket. This thread also forgets idle clients, waking for that only
//!     when the oldest one could have expired.
//! - Spin, then block: while datagrams come close together, a thread that
//!   has relayed some asks again without blocking for a few tens of
//!   microseconds before it sleeps in the kernel, because being woken (on
//!   a VM, a halted vCPU being woken) costs more than the relay itself.
//!   Sparse traffic and an idle proxy never spin. `Pace` has the rules.
//!   Off unless `ENVOY_DOCKER_UDP_SPIN_US` sets a window: it trades CPU
//!   for latency, and the batching alone meets the targets.
//! - Batches: under load, one system call moves up to `BATCH` datagrams
//!   each way, so a flood costs the proxy a fraction of what it costs
//!   docker-proxy, which makes two system calls per datagram.
//! - GRO and GSO: every socket asks for `UDP_GRO`, so a train of same-size
//!   datagrams that the kernel kept together (sent with GSO, or merged by a
//!   NIC's GRO) arrives as one buffer with its segment size. Going out,
//!   consecutive datagrams to one peer with one size (the last may be
//!   shorter) leave as one `UDP_SEGMENT` send. The peer gets the same
//!   datagrams either way: for a socket without `UDP_GRO` the kernel splits
//!   the train again. Where a route cannot take a segment size (an MTU
//!   below it) or the kernel lacks `UDP_SEGMENT`, the relay learns it from
//!   the error, sends those datagrams one by one, and after that sends
//!   datagrams that size plainly.
//! - Sends never block: when a socket buffer is full the datagram is
//!   dropped, as a router would, instead of stalling every other client.
//!   An ECONNREFUSED on a send reports an earlier datagram's ICMP, and the
//!   kernel did not send this one, so it is sent once more.
//!
//! The parts: `relay` has the two threads; `clients` the table of clients
//! and what the threads share; `recv` and `send` the batched system calls
//! (with GRO and GSO); `pace` when to spin. Here: the host socket and the
//! start.

mod clients;
mod pace;
mod recv;
mod relay;
mod send;
#[cfg(test)]
mod tests;

pub use clients::MAX_CLIENTS;
pub use pace::SPIN_ENV;
pub use recv::MAX_DATAGRAM;

use clients::Shared;
use nix::libc;
use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A client without traffic either way for this long is forgotten.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The relay threads' stacks; their buffers are on the heap.
const STACK: usize = 256 * 1024;

/// Binds the host side. An IPv6 socket is IPv6-only, so that `::` and
/// `0.0.0.0` on one port can coexist as dockerd expects.
pub fn bind_host(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(StdUdpSocket::from(fd))
}

/// Wraps a socket dockerd bound for us (fd 4 with `-use-listen-fd`).
pub fn adopt(fd: OwnedFd) -> io::Result<StdUdpSocket> {
    let sock = StdUdpSocket::from(fd);
    sock.local_addr()?; // fails unless it is a bound socket
    Ok(sock)
}

/// Starts relaying between `host` and `backend` on two threads of their
/// own, which run until the process ends.
pub fn start(host: StdUdpSocket, backend: SocketAddr) -> io::Result<()> {
    start_with(host, backend, IDLE_TIMEOUT).map(drop)
}

fn start_with(host: StdUdpSocket, backend: SocketAddr, idle: Duration) -> io::Result<Arc<Shared>> {
    // The inbound thread waits in recvmmsg itself; sends say MSG_DONTWAIT.
    host.set_nonblocking(false)?;
    // Coalesced trains are welcome; without UDP_GRO they come one by one.
    let _ = setsockopt(&host, sockopt::UdpGroSegment, &true);
    // SAFETY: epoll_create1 has no memory arguments; a non-negative result
    // is a new descriptor that nothing else owns.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: the descriptor is fresh and ours alone.
    let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
    let shared = Arc::new(Shared {
        host,
        backend,
        epoll,
        table: Mutex::default(),
        epoch: Instant::now(),
        idle_ms: idle.as_millis() as u64,
        spin: pace::spin_window(),
    });
    for (name, work) in [
        ("udp-in", relay::inbound as fn(Arc<Shared>)),
        ("udp-out", relay::outbound),
    ] {
        let s = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(STACK)
            .spawn(move || work(s))?;
    }
    Ok(shared)
}
