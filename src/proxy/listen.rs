//! The TCP port's listening socket, which the proxy owns and Envoy borrows.
//!
//! Three ways to get one:
//! - [`adopt`]: Docker 28 and later bind and listen in dockerd and pass the
//!   socket as fd 4 (`-use-listen-fd`);
//! - [`bind_exclusive`]: Docker 20.10 to 27 leave the bind to the proxy, as
//!   docker-proxy does it, so a port held by any other program is a conflict;
//! - [`bind_shared`]: a fresh socket when the proxy takes the port back from
//!   an Envoy that went away, which may still be bound beside it.
//!
//! Every socket ends up with `SO_REUSEPORT`, so that Envoy (same uid, its
//! `enable_reuse_port` default) can bind the same address into the same
//! reuse-port group. The kernel accepts the option on a socket that is
//! already listening.

use nix::sys::socket::{
    bind, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrStorage,
};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};

/// Wraps the socket dockerd bound and listens on. It is normally listening
/// already; `listen` is called only if it is not.
pub fn adopt(fd: OwnedFd) -> io::Result<TcpListener> {
    let kind = getsockopt(&fd, sockopt::SockType)?;
    if kind != SockType::Stream {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd 4 is not a TCP socket",
        ));
    }
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if !getsockopt(&fd, sockopt::AcceptConn)? {
        listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(TcpListener::from(fd))
}

/// Binds as docker-proxy does: without `SO_REUSEPORT` at bind time, so any
/// other holder of the port makes this fail; the option is set afterwards.
pub fn bind_exclusive(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = new_socket(addr)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Binds into the port's reuse-port group, beside any Envoy still in it.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = new_socket(addr)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// A close-on-exec TCP socket with `SO_REUSEADDR` (as Go's listeners and
/// dockerd set it), IPv6-only for IPv6, so that `::` and `0.0.0.0` on one
/// port coexist as two mappings.
fn new_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_conflicts_with_a_plain_holder_and_shared_joins_its_own_group() {
        let first = bind_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        // Same uid and both with SO_REUSEPORT: a second member may join.
        let second = bind_shared(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // An exclusive bind is a conflict, as docker-proxy's would be.
        let err = bind_exclusive(addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // A holder without SO_REUSEPORT keeps even a shared bind out.
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_shared(plain.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn an_adopted_listening_socket_admits_a_reuse_port_neighbour() {
        // As dockerd 28 makes it: SO_REUSEADDR, bind, listen; no SO_REUSEPORT.
        let theirs = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = theirs.local_addr().unwrap();
        let ours = adopt(OwnedFd::from(theirs)).unwrap();
        let envoy_like = bind_shared(addr).unwrap();
        drop((ours, envoy_like));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(adopt(OwnedFd::from(udp)).is_err());
    }
}
