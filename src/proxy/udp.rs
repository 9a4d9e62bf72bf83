//! The in-process UDP relay, with docker-proxy's semantics: one upstream
//! socket per client address, forgotten after 90 s without traffic in
//! either direction, datagrams up to 65507 bytes, and ECONNREFUSED from the
//! container ignored. At most [`MAX_CLIENTS`] client addresses are relayed
//! at once: datagrams from further new addresses are dropped (and said
//! once) until one goes idle, so spoofed sources cannot use up the proxy's
//! descriptors.

use crate::proxy::say::say;
use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::{sleep_until, Instant};

pub const MAX_DATAGRAM: usize = 65507;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Client addresses relayed at once, each with its own upstream socket.
pub const MAX_CLIENTS: usize = 4096;

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
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(StdUdpSocket::from(fd))
}

/// Wraps a socket dockerd bound for us (fd 4 with `-use-listen-fd`).
pub fn adopt(fd: OwnedFd) -> io::Result<StdUdpSocket> {
    let sock = StdUdpSocket::from(fd);
    sock.local_addr()?; // fails unless it is a bound socket
    Ok(sock)
}

struct Client {
    upstream: UdpSocket,
    /// Milliseconds since `Relay::epoch` of the last datagram either way.
    last: AtomicU64,
}

pub struct Relay {
    host: Arc<UdpSocket>,
    backend: SocketAddr,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<Client>>>>,
    epoch: Instant,
}

impl Relay {
    pub fn new(host: StdUdpSocket, backend: SocketAddr) -> io::Result<Relay> {
        host.set_nonblocking(true)?;
        Ok(Relay {
            host: Arc::new(UdpSocket::from_std(host)?),
            backend,
            clients: Arc::default(),
            epoch: Instant::now(),
        })
    }

    /// Relays until the process ends.
    pub async fn run(self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut said_full = false;
        loop {
            let (n, from) = match self.host.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("udp receive: {e}");
                    continue;
                }
            };
            let client = match self.client(from).await {
                Ok(c) => c,
                Err(e) => {
                    // Said once: a flood of new sources would flood the log.
                    if !std::mem::replace(&mut said_full, true) {
                        say(&format!("udp: no upstream socket for {from}: {e}"));
                    }
                    continue;
                }
            };
            client.last.store(self.now(), Ordering::Relaxed);
            if let Err(e) = client.upstream.send(&buf[..n]).await {
                if e.kind() != io::ErrorKind::ConnectionRefused {
                    tracing::debug!("udp send to {}: {e}", self.backend);
                }
            }
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn client(&self, from: SocketAddr) -> io::Result<Arc<Client>> {
        if let Some(c) = self.clients.lock().expect("clients lock").get(&from) {
            return Ok(c.clone());
        }
        let local: SocketAddr = if self.backend.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        if self.clients.lock().expect("clients lock").len() >= MAX_CLIENTS {
            return Err(io::Error::other(format!(
                "{MAX_CLIENTS} clients are being relayed already"
            )));
        }
        let upstream = UdpSocket::bind(local).await?;
        upstream.connect(self.backend).await?;
        let client = Arc::new(Client {
            upstream,
            last: AtomicU64::new(self.now()),
        });
        self.clients
            .lock()
            .expect("clients lock")
            .insert(from, client.clone());
        tokio::spawn(replies(
            client.clone(),
            from,
            self.host.clone(),
            self.clients.clone(),
            self.epoch,
        ));
        Ok(client)
    }
}

/// Sends the container's replies back to one client until it goes idle.
async fn replies(
    client: Arc<Client>,
    to: SocketAddr,
    host: Arc<UdpSocket>,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<Client>>>>,
    epoch: Instant,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let last = Duration::from_millis(client.last.load(Ordering::Relaxed));
        let deadline = epoch + last + IDLE_TIMEOUT;
        tokio::select! {
            r = client.upstream.recv(&mut buf) => match r {
                Ok(n) => {
                    client.last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if let Err(e) = host.send_to(&buf[..n], to).await {
                        tracing::debug!("udp reply to {to}: {e}");
                    }
                }
                // ICMP port unreachable from the container: ignored, as
                // docker-proxy does, until the client goes idle.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::debug!("udp upstream for {to}: {e}");
                    break;
                }
            },
            _ = sleep_until(deadline) => {
                let seen = Duration::from_millis(client.last.load(Ordering::Relaxed));
                if epoch + seen + IDLE_TIMEOUT <= Instant::now() {
                    break;
                }
            }
        }
    }
    clients.lock().expect("clients lock").remove(&to);
}
