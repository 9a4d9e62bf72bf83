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

use crate::proxy::say::say;
use nix::libc;
use nix::sys::socket::{
    bind, getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrLike,
    SockaddrStorage,
};
use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket as StdUdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const MAX_DATAGRAM: usize = 65507;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Client addresses relayed at once, each with its own upstream socket.
pub const MAX_CLIENTS: usize = 4096;

/// Messages taken per `recvmmsg`: enough to spread a system call over many
/// datagrams under load; the buffers are touched only as far as datagrams
/// fill them.
const BATCH: usize = 32;
/// Bytes per receive slot: room for any UDP payload (65507 bytes over IPv4,
/// 65527 over IPv6) and for any GRO train, so nothing is ever truncated.
const SLOT: usize = 65536;
/// Control bytes per received message: `UDP_GRO`'s int, and `IP_PKTINFO`,
/// which the sockets dockerd makes ask for, with room to spare.
const CTRL: usize = 128;
/// Segments in one `UDP_SEGMENT` send: the kernel's `UDP_MAX_SEGMENTS` is
/// 64 on older kernels and 128 on newer ones.
const MAX_SEGMENTS: usize = 64;
/// The most bytes one `UDP_SEGMENT` send carries: the IPv4 payload limit,
/// which IPv6 also stays within.
const MAX_TRAIN: usize = MAX_DATAGRAM;
/// Sends (datagrams or trains) per `sendmmsg`.
const SEND_BATCH: usize = 64;
/// Ready upstream sockets taken per `epoll_wait`.
const EVENTS: usize = 64;
/// How long a relay thread keeps asking for the next datagram, without
/// blocking, before it sleeps; see [`Pace`]. Off by default: a proxy on a
/// Docker host must not burn a CPU for latency nobody asked for.
const SPIN: Duration = Duration::ZERO;
/// Sets `SPIN`, in microseconds (50 is a good value); 0 never spins.
pub const SPIN_ENV: &str = "ENVOY_DOCKER_UDP_SPIN_US";
/// A thread spins only after a datagram that came at most this long after
/// the one before: traffic that dense is likely to go on.
const DENSE: Duration = Duration::from_micros(200);
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
        spin: spin_window(),
    });
    for (name, work) in [
        ("udp-in", inbound as fn(Arc<Shared>)),
        ("udp-out", outbound),
    ] {
        let s = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(STACK)
            .spawn(move || work(s))?;
    }
    Ok(shared)
}

/// What both relay threads share.
struct Shared {
    host: StdUdpSocket,
    backend: SocketAddr,
    /// Every client's upstream socket, with the client's token as data.
    epoll: OwnedFd,
    table: Mutex<Table>,
    epoch: Instant,
    idle_ms: u64,
    /// How long to spin; see [`Pace`].
    spin: Duration,
}

fn spin_window() -> Duration {
    std::env::var(SPIN_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_micros)
        .unwrap_or(SPIN)
}

/// The clients being relayed, by address (for the inbound thread) and by
/// token (for the outbound one, which gets tokens from epoll).
#[derive(Default)]
struct Table {
    by_addr: HashMap<SocketAddr, Arc<Client>>,
    by_token: HashMap<u64, Arc<Client>>,
    next_token: u64,
}

struct Client {
    /// Connected to the backend.
    upstream: StdUdpSocket,
    addr: SocketAddr,
    /// Where replies go, as the kernel takes it.
    dest: SockaddrStorage,
    token: u64,
    /// Milliseconds since `Shared::epoch` of the last datagram either way.
    last: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means a thread died holding it; the table
        // itself is still consistent enough to relay with.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client `from`, made with its upstream socket on its first
    /// datagram. Called with the table locked.
    fn client(&self, table: &mut Table, from: SocketAddr) -> io::Result<Arc<Client>> {
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
    fn forget(&self, table: &mut Table, c: &Client) {
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
    fn sweep(&self, now: u64) -> u64 {
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

/// Host to containers: one thread, blocked in recvmmsg on the host socket.
fn inbound(shared: Arc<Shared>) {
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
fn outbound(shared: Arc<Shared>) {
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

/// Spin, then block: when datagrams come close together, a relay thread
/// that has just relayed some asks again without blocking, for up to
/// [`SPIN`], before it goes to sleep in the kernel. Waking a sleeping
/// thread (and, worse, an idle CPU, which in a VM means a halted vCPU)
/// costs more than the whole relay. Measured with bench/udp.py on a 2-vCPU
/// VM, 64-byte ping-pong round trips: 30 us through the proxy spinning,
/// 80 us sleeping, 130 us through docker-proxy, and 12 to 70 us direct (as
/// client and backend happen to share a CPU or not). With everything
/// pinned to one CPU: 31 us spinning, 35 us sleeping, 34 us docker-proxy,
/// 12 us direct. The price is CPU time while traffic is dense: 69% of a
/// CPU during that ping-pong, against 27% sleeping and 33% for
/// docker-proxy.
///
/// Spinning is only tried while it pays: after a datagram that came within
/// [`DENSE`] of the one before (so sparse traffic, and an idle proxy, never
/// spin; a flood has data waiting anyway), and not after spins that found
/// nothing: each such spin makes the thread block for the next 1, 3, 7 ...
/// up to [`MAX_BACKOFF`] datagrams without spinning, until a spin pays off
/// again, so traffic that is frequent but slower than the window does not
/// keep a CPU spinning in vain. While it spins, the thread yields the CPU
/// to whatever else is runnable there (see [`Pace::nothing`]).
/// [`SPIN_ENV`] sets the window; 0 turns spinning off.
struct Pace {
    window: Duration,
    /// When the thread last finished relaying.
    done: Instant,
    /// Asking without blocking since `done`.
    spinning: bool,
    /// Whether the last datagrams came close after the ones before.
    dense: bool,
    /// Datagrams still to block for, and how many the next spin that
    /// finds nothing will add.
    skip: u32,
    backoff: u32,
}

/// The most datagrams a thread blocks for after a spin that found nothing.
const MAX_BACKOFF: u32 = 63;

impl Pace {
    fn new(window: Duration) -> Pace {
        Pace {
            window,
            done: Instant::now(),
            spinning: false,
            dense: false,
            skip: 0,
            backoff: 0,
        }
    }

    /// Whether to ask again without blocking.
    fn spin(&mut self) -> bool {
        if !self.spinning {
            return false;
        }
        if self.done.elapsed() < self.window {
            return true;
        }
        // Nothing came within the window: spinning does not pay just now.
        self.spinning = false;
        self.backoff = (self.backoff * 2 + 1).min(MAX_BACKOFF);
        self.skip = self.backoff;
        false
    }

    /// Datagrams have come.
    fn arrived(&mut self) {
        if self.spinning {
            self.backoff = 0; // a spin paid off
        }
        self.spinning = false;
        self.dense = self.done.elapsed() <= DENSE;
    }

    /// They have been relayed.
    fn done(&mut self) {
        self.done = Instant::now();
        if self.skip > 0 {
            self.skip -= 1;
        } else {
            self.spinning = self.dense && !self.window.is_zero();
        }
    }

    /// A spin found nothing yet: whatever else can run on this CPU goes
    /// first. The peer that answers may be waiting for this very CPU, and
    /// the scheduler need not preempt a spinning thread for it.
    fn nothing(&self) {
        // SAFETY: sched_yield has no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
    }
}

/// Buffers and headers for `recvmmsg`.
struct Receiver {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<Ctrl>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

/// One message's control buffer, aligned as cmsghdr needs.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL]);

/// An all-zero msghdr: null pointers and zero lengths.
fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (integers and raw pointers), for which
    // all zeroes is a valid value. Built so because musl's has private
    // padding fields.
    unsafe { std::mem::zeroed() }
}

impl Receiver {
    fn new() -> Receiver {
        // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
        let name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Receiver {
            // Zeroed memory comes from mmap: pages cost only once written.
            bufs: vec![0u8; BATCH * SLOT],
            names: vec![name; BATCH],
            ctrl: vec![Ctrl([0; CTRL]); BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                BATCH
            ],
            hdrs: vec![
                libc::mmsghdr {
                    msg_hdr: empty_msghdr(),
                    msg_len: 0,
                };
                BATCH
            ],
        }
    }

    /// Receives up to BATCH messages from `fd`; returns how many.
    fn recv(&mut self, fd: RawFd, flags: i32) -> io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * SLOT + SLOT <= bufs.len(), so the slot is in bounds.
            self.iovs[i].iov_base = unsafe { base.add(i * SLOT) }.cast();
            self.iovs[i].iov_len = SLOT;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as _;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = CTRL as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers of the sizes it states,
        // all owned by self and not otherwise borrowed during the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as _,
                flags as _,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Message i's sender.
    fn source(&self, i: usize) -> Option<SocketAddr> {
        socket_addr(&self.names[i], self.hdrs[i].msg_hdr.msg_namelen)
    }

    /// Message i's bytes and, for a GRO train, its segment size (0 for a
    /// single datagram). None if it was truncated, which the slot size
    /// rules out.
    fn message(&self, i: usize) -> Option<(&[u8], usize)> {
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = (h.msg_len as usize).min(SLOT);
        #[allow(clippy::unnecessary_cast)] // a u32 on musl
        let used = (h.msg_hdr.msg_controllen as usize).min(CTRL);
        let data = &self.bufs[i * SLOT..i * SLOT + len];
        Some((data, gro_segment(&self.ctrl[i].0[..used])))
    }
}

/// The segment size in a `UDP_GRO` control message, or 0.
fn gro_segment(ctrl: &[u8]) -> usize {
    let head = size_of::<libc::cmsghdr>();
    let align = size_of::<usize>();
    let mut off = 0;
    while off + head <= ctrl.len() {
        // SAFETY: off + head is within ctrl, and read_unaligned needs no
        // alignment; cmsghdr is plain integers.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctrl.as_ptr().add(off).cast()) };
        let len = c.cmsg_len as usize;
        if len < head || off + len > ctrl.len() {
            break;
        }
        if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == libc::UDP_GRO && len >= head + 4 {
            let mut v = [0u8; 4];
            v.copy_from_slice(&ctrl[off + head..off + head + 4]);
            return i32::from_ne_bytes(v).max(0) as usize;
        }
        off += (len + align - 1) & !(align - 1);
    }
    0
}

/// A socket address the kernel wrote; IPv6 flow labels are left out, so a
/// client is known by address and port alone.
fn socket_addr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as i32 {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: sockaddr_storage is big and aligned enough for every
            // sockaddr, and the family says the kernel wrote a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddrV6::new(ip, port, 0, sin6.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// What this thread has learnt about `UDP_SEGMENT` on its sends.
struct Gso {
    /// The largest segment size to try; 0 when the kernel lacks it.
    max: usize,
}

impl Gso {
    fn probe(sock: &StdUdpSocket) -> Gso {
        let max = match getsockopt(sock, sockopt::UdpGsoSegment) {
            Ok(_) => MAX_TRAIN,
            Err(_) => 0,
        };
        Gso { max }
    }

    fn allows(&self, seg: usize) -> bool {
        seg > 0 && seg <= self.max
    }

    /// Learns from a `UDP_SEGMENT` send with segment size `seg` that failed
    /// with `errno`; false if the error is not about segmentation.
    fn failed(&mut self, seg: usize, errno: i32) -> bool {
        match errno {
            // The route's MTU is below the segment size.
            libc::EINVAL | libc::EMSGSIZE => self.max = self.max.min(seg.saturating_sub(1)),
            // No checksum offload on the way, or no UDP_SEGMENT at all.
            libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP => self.max = 0,
            _ => return false,
        }
        true
    }
}

/// One send: a datagram, or a train of `segs` segments of `seg` bytes (the
/// last may be shorter) sent with `UDP_SEGMENT`.
#[derive(Clone, Copy)]
struct Unit {
    first_iov: usize,
    iovs: usize,
    seg: usize,
    segs: usize,
    len: usize,
    /// Its last segment is short, so nothing more may follow in it.
    closed: bool,
}

/// Groups datagrams to one destination into sends, and sends them with
/// `sendmmsg`. Its iovecs point into a [`Receiver`]'s buffers only for the
/// length of one [`Sender::relay`] call.
struct Sender {
    gso: Gso,
    fd: RawFd,
    dest: Option<SockaddrStorage>,
    units: Vec<Unit>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<Ctrl>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Sender {
    fn new(gso: Gso) -> Sender {
        Sender {
            gso,
            fd: -1,
            dest: None,
            units: Vec::with_capacity(SEND_BATCH),
            iovs: Vec::with_capacity(BATCH),
            ctrl: vec![Ctrl([0; CTRL]); SEND_BATCH],
            hdrs: vec![
                libc::mmsghdr {
                    msg_hdr: empty_msghdr(),
                    msg_len: 0,
                };
                SEND_BATCH
            ],
        }
    }

    /// Sends messages `range` of `rx` on `fd`, to `dest` or, for a
    /// connected socket, to its peer.
    fn relay(
        &mut self,
        rx: &Receiver,
        range: std::ops::Range<usize>,
        fd: RawFd,
        dest: Option<&SockaddrStorage>,
    ) {
        self.fd = fd;
        self.dest = dest.copied();
        for i in range {
            if let Some((data, seg)) = rx.message(i) {
                self.push(data, seg);
            }
        }
        self.flush();
    }

    /// Adds a datagram, or a GRO train with segment size `gro`.
    fn push(&mut self, data: &[u8], gro: usize) {
        let len = data.len();
        let single = gro == 0 || gro >= len;
        let seg = if single { len } else { gro };
        let segs = if single { 1 } else { len.div_ceil(seg) };
        if segs > 1 && (!self.gso.allows(seg) || len > MAX_TRAIN || segs > MAX_SEGMENTS) {
            for d in data.chunks(seg) {
                self.push(d, 0);
            }
            return;
        }
        // Joins the unit before it if that is a train (or a datagram that
        // can start one) of this segment size, still open, with room.
        if let Some(u) = self.units.last_mut() {
            let fits = if single { len <= u.seg } else { seg == u.seg };
            if fits
                && len > 0
                && !u.closed
                && self.gso.allows(u.seg)
                && u.segs + segs <= MAX_SEGMENTS
                && u.len + len <= MAX_TRAIN
            {
                u.iovs += 1;
                u.segs += segs;
                u.len += len;
                u.closed = !len.is_multiple_of(u.seg);
                self.iovs.push(iovec(data));
                return;
            }
        }
        if self.units.len() == SEND_BATCH {
            self.flush();
        }
        self.units.push(Unit {
            first_iov: self.iovs.len(),
            iovs: 1,
            seg,
            segs,
            len,
            closed: len == 0 || !len.is_multiple_of(seg),
        });
        self.iovs.push(iovec(data));
    }

    /// Sends every unit gathered, then forgets them.
    fn flush(&mut self) {
        let n = self.units.len();
        for (k, u) in self.units.iter().enumerate() {
            let h = &mut self.hdrs[k].msg_hdr;
            *h = empty_msghdr();
            if let Some(d) = &self.dest {
                h.msg_name = d.as_ptr().cast_mut().cast();
                h.msg_namelen = d.len();
            }
            h.msg_iov = self.iovs[u.first_iov..].as_mut_ptr();
            h.msg_iovlen = u.iovs as _;
            if u.segs > 1 {
                h.msg_control = self.ctrl[k].0.as_mut_ptr().cast();
                h.msg_controllen = segment_cmsg(&mut self.ctrl[k], u.seg) as _;
            }
        }
        let mut i = 0;
        let mut retried = usize::MAX;
        while i < n {
            // SAFETY: headers i..n point at iovecs, control buffers and the
            // destination held by self, and the iovecs at bytes of the
            // Receiver that `relay` borrows for this whole call.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd,
                    self.hdrs[i..].as_mut_ptr(),
                    (n - i) as _,
                    (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as _,
                )
            };
            if r > 0 {
                i += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            let errno = e.raw_os_error().unwrap_or(0);
            match errno {
                libc::EINTR => {}
                // The socket buffer is full: the rest is dropped.
                libc::EAGAIN => break,
                // An earlier datagram's ICMP; this one was not sent.
                libc::ECONNREFUSED if retried != i => retried = i,
                _ if self.units[i].segs > 1 && self.gso.failed(self.units[i].seg, errno) => {
                    self.send_one_by_one(i);
                    i += 1;
                }
                _ => {
                    tracing::debug!("udp send: {e}");
                    i += 1;
                }
            }
        }
        self.units.clear();
        self.iovs.clear();
    }

    /// Sends unit k's segments as datagrams of their own, after the kernel
    /// refused them as one train.
    fn send_one_by_one(&mut self, k: usize) {
        let u = self.units[k];
        let (name, namelen) = match &self.dest {
            Some(d) => (d.as_ptr(), d.len()),
            None => (std::ptr::null(), 0),
        };
        for v in &self.iovs[u.first_iov..u.first_iov + u.iovs] {
            // Each iovec but the last holds whole segments, so every
            // segment lies within one.
            let mut off = 0;
            while off < v.iov_len {
                let len = u.seg.min(v.iov_len - off);
                for _ in 0..2 {
                    // SAFETY: off + len <= iov_len, within the bytes the
                    // iovec points at (see flush); name is null or a
                    // sockaddr of namelen bytes held by self.
                    let r = unsafe {
                        libc::sendto(
                            self.fd,
                            v.iov_base.cast::<u8>().add(off).cast(),
                            len,
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                            name,
                            namelen,
                        )
                    };
                    // Sent again once after an earlier datagram's refusal.
                    if r >= 0
                        || io::Error::last_os_error().raw_os_error() != Some(libc::ECONNREFUSED)
                    {
                        break;
                    }
                }
                off += len;
            }
        }
    }
}

fn iovec(data: &[u8]) -> libc::iovec {
    libc::iovec {
        // The kernel only reads through it: these are sends.
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    }
}

/// Writes a `UDP_SEGMENT` control message for segment size `seg` into
/// `ctrl`; returns its length.
fn segment_cmsg(ctrl: &mut Ctrl, seg: usize) -> usize {
    let head = size_of::<libc::cmsghdr>();
    let align = size_of::<usize>();
    // SAFETY: all zeroes is a valid cmsghdr (plain integers).
    let mut c: libc::cmsghdr = unsafe { std::mem::zeroed() };
    c.cmsg_len = (head + 2) as _;
    c.cmsg_level = libc::SOL_UDP;
    c.cmsg_type = libc::UDP_SEGMENT;
    // SAFETY: ctrl holds CTRL >= head bytes, read_unaligned's counterpart
    // needs no alignment, and cmsghdr is plain integers.
    unsafe { std::ptr::write_unaligned(ctrl.0.as_mut_ptr().cast(), c) };
    let seg = u16::try_from(seg).unwrap_or(u16::MAX);
    ctrl.0[head..head + 2].copy_from_slice(&seg.to_ne_bytes());
    (head + 2 + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A UDP echo server on 127.0.0.1 that also reports each datagram's
    /// length.
    fn echo() -> (SocketAddr, mpsc::Receiver<usize>) {
        let sock = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; SLOT];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = tx.send(n);
                let _ = sock.send_to(&buf[..n], from);
            }
        });
        (addr, rx)
    }

    fn client() -> StdUdpSocket {
        let c = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c
    }

    fn relay(backend: SocketAddr, idle: Duration) -> (SocketAddr, Arc<Shared>) {
        let host = bind_host("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = host.local_addr().unwrap();
        (addr, start_with(host, backend, idle).unwrap())
    }

    fn round_trip(c: &StdUdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
        c.send_to(msg, to).unwrap();
        let mut buf = vec![0u8; SLOT];
        let (n, from) = c.recv_from(&mut buf).expect("no echo");
        assert_eq!(from, to, "the reply comes from the published port");
        buf.truncate(n);
        buf
    }

    #[test]
    fn relays_both_ways_for_two_clients_up_to_the_largest_datagram() {
        let (backend, _) = echo();
        let (to, shared) = relay(backend, IDLE_TIMEOUT);
        let threads: Vec<_> = (0..2u8)
            .map(|i| {
                std::thread::spawn(move || {
                    let c = client();
                    for round in 0..20 {
                        let msg = format!("client {i} round {round}");
                        assert_eq!(round_trip(&c, to, msg.as_bytes()), msg.as_bytes());
                    }
                    let big = vec![i; MAX_DATAGRAM];
                    assert_eq!(round_trip(&c, to, &big), big);
                    assert_eq!(round_trip(&c, to, b""), b"");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(shared.table().by_addr.len(), 2);
    }

    /// Datagrams queued before the relay starts come in one recvmmsg, so
    /// this exercises batching and UDP_SEGMENT trains, with sizes that
    /// join and break trains: every datagram arrives whole and in order.
    #[test]
    fn a_batch_of_mixed_sizes_arrives_whole_and_in_order() {
        let (backend, lengths) = echo();
        let host = bind_host("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = host.local_addr().unwrap();
        let c = client();
        // Kept well within a default receive buffer (212992 bytes, counted
        // with each datagram's overhead) on both sides.
        let sizes: Vec<usize> = [
            100, 100, 100, 40, 100, 0, 0, 30, 30, 31, 1472, 1472, 1472, 9000, 9000, 5, 1, 65507,
            200, 200,
        ]
        .into_iter()
        .chain(std::iter::repeat_n(100, 40))
        .chain([99, 1000, 1000])
        .collect();
        let mut sent = 0;
        for (k, &n) in sizes.iter().enumerate() {
            let msg = vec![k as u8; n];
            c.send_to(&msg, to).unwrap();
            sent += n;
        }
        assert!(sent < 400_000);
        start_with(host, backend, IDLE_TIMEOUT).unwrap();
        for (k, &n) in sizes.iter().enumerate() {
            let got = lengths
                .recv_timeout(Duration::from_secs(3))
                .expect("at the backend");
            assert_eq!(got, n, "datagram {k} at the backend");
        }
        let mut buf = vec![0u8; SLOT];
        for (k, &n) in sizes.iter().enumerate() {
            let (got, _) = c.recv_from(&mut buf).expect("echoed");
            assert_eq!(got, n, "datagram {k} back");
            assert!(
                buf[..got].iter().all(|&b| b == k as u8),
                "datagram {k}'s bytes"
            );
        }
    }

    /// A client that sends a GSO train: the relay takes it in one piece
    /// (UDP_GRO) and the backend still gets separate datagrams.
    #[test]
    fn a_gso_train_from_a_client_arrives_as_its_datagrams() {
        let (backend, lengths) = echo();
        let (to, _shared) = relay(backend, IDLE_TIMEOUT);
        let c = client();
        if getsockopt(&c, sockopt::UdpGsoSegment).is_err() {
            return; // a kernel without UDP_SEGMENT
        }
        let train: Vec<u8> = (0..5 * 1000 + 300).map(|i| (i / 1000) as u8).collect();
        let mut ctrl = Ctrl([0; CTRL]);
        let dest = SockaddrStorage::from(to);
        let mut iov = iovec(&train);
        let mut h = empty_msghdr();
        h.msg_name = dest.as_ptr().cast_mut().cast();
        h.msg_namelen = dest.len();
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = ctrl.0.as_mut_ptr().cast();
        h.msg_controllen = segment_cmsg(&mut ctrl, 1000) as _;
        // SAFETY: h points at train, dest and ctrl, all alive here.
        let r = unsafe { libc::sendmsg(c.as_raw_fd(), &h, 0) };
        assert_eq!(r, train.len() as isize, "{}", io::Error::last_os_error());
        let mut buf = vec![0u8; SLOT];
        for (k, want) in [1000, 1000, 1000, 1000, 1000, 300].into_iter().enumerate() {
            assert_eq!(lengths.recv_timeout(Duration::from_secs(3)).unwrap(), want);
            let (n, _) = c.recv_from(&mut buf).unwrap();
            assert_eq!(n, want, "segment {k} back");
            assert!(
                buf[..n].iter().all(|&b| b == k as u8),
                "segment {k}'s bytes"
            );
        }
    }

    #[test]
    fn a_refusing_container_is_ignored_until_it_listens() {
        // A port nothing listens on yet.
        let spot = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let backend = spot.local_addr().unwrap();
        drop(spot);
        let (to, shared) = relay(backend, IDLE_TIMEOUT);
        let c = client();
        for _ in 0..5 {
            c.send_to(b"anyone?", to).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let sock = StdUdpSocket::bind(backend).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.send_to(b"now", to).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"now");
        sock.send_to(b"hello", from).unwrap();
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(shared.table().by_addr.len(), 1);
    }

    #[test]
    fn an_idle_client_is_forgotten_and_a_busy_one_kept() {
        let (backend, _) = echo();
        let idle = Duration::from_millis(300);
        let (to, shared) = relay(backend, idle);
        let quiet = client();
        let busy = client();
        round_trip(&quiet, to, b"once");
        for _ in 0..8 {
            round_trip(&busy, to, b"again");
            std::thread::sleep(Duration::from_millis(100));
        }
        let table = shared.table();
        let left: Vec<_> = table.by_addr.keys().copied().collect();
        assert_eq!(left, [busy.local_addr().unwrap()]);
        assert_eq!(table.by_token.len(), 1);
        drop(table);
        // Forgotten clients come back as new ones.
        assert_eq!(round_trip(&quiet, to, b"back"), b"back");
    }

    #[test]
    fn ipv6_host_sockets_are_v6_only() {
        let Ok(host) = bind_host("[::1]:0".parse().unwrap()) else {
            return; // no IPv6 here
        };
        let v6only: bool = getsockopt(&host, sockopt::Ipv6V6Only).unwrap();
        assert!(v6only);
    }

    #[test]
    fn gro_segment_reads_only_a_udp_gro_message() {
        let mut ctrl = Ctrl([0; CTRL]);
        let n = segment_cmsg(&mut ctrl, 1200);
        // UDP_SEGMENT is not UDP_GRO.
        assert_eq!(gro_segment(&ctrl.0[..n]), 0);
        let head = size_of::<libc::cmsghdr>();
        // SAFETY: as in segment_cmsg.
        let mut c: libc::cmsghdr = unsafe { std::mem::zeroed() };
        c.cmsg_len = (head + 4) as _;
        c.cmsg_level = libc::SOL_UDP;
        c.cmsg_type = libc::UDP_GRO;
        // SAFETY: ctrl is CTRL bytes, more than n + head.
        unsafe { std::ptr::write_unaligned(ctrl.0.as_mut_ptr().add(n).cast(), c) };
        ctrl.0[n + head..n + head + 4].copy_from_slice(&1200i32.to_ne_bytes());
        assert_eq!(gro_segment(&ctrl.0[..n + head + 4]), 1200);
        // Truncated or garbage control data is not read past.
        assert_eq!(gro_segment(&ctrl.0[..n + head]), 0);
        assert_eq!(gro_segment(&[0xff; 7]), 0);
        assert_eq!(gro_segment(&[0xff; 64]), 0);
    }
}
