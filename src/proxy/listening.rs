//! Does any socket still listen on the proxy's TCP address? Asked of the
//! kernel through sock_diag (`NETLINK_SOCK_DIAG`, an `inet_diag` request
//! for one socket), so no connection is opened and nothing is dumped.
//!
//! Why a proxy asks: once it has handed its port over, Envoy alone listens
//! there. If the registrar and Envoy die together, nobody would tell the
//! proxy to take the port back, and the claimed port (see `nft`) would
//! refuse connections until the registrar returns. A proxy that has lost
//! the registrar therefore asks every [`CHECK_EVERY`] whether a listener is
//! left, and takes the port back when none is.
//!
//! The request names only the local end (address and port; the remote end
//! is zero) and no cookie. For such a request the kernel looks the socket
//! up as it would for an incoming connection to that address: a listener
//! bound to exactly that address, or to the wildcard of its family,
//! answers; nothing else can. The answer is one `inet_diag_msg` (found), or
//! an error message carrying `-ENOENT` (none).
//!
//! The message layouts are the kernel's UAPI (`linux/netlink.h`,
//! `linux/sock_diag.h`, `linux/inet_diag.h`); encoding and decoding are
//! pure and tested here.

use nix::sys::socket::{
    recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType,
};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// How often an orphaned proxy that has handed over asks. Well under the
/// 250 ms within which it must notice that nobody listens any more.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How long one answer may take before the question counts as failed.
const ANSWER_WITHIN: Duration = Duration::from_millis(100);

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR: usize = 16;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then the
/// 48-byte `inet_diag_sockid`.
const REQ_LEN: usize = 8 + 48;
const TCP_LISTEN_BIT: u32 = 1 << 10;
const ENOENT: i32 = 2;

/// What the kernel said about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Listening,
    Nobody,
}

/// The request for a TCP listener on `addr`, with sequence number `seq`.
pub fn request(addr: SocketAddr, seq: u32) -> [u8; NLMSG_HDR + REQ_LEN] {
    let mut b = [0u8; NLMSG_HDR + REQ_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel.
    let r = &mut b[NLMSG_HDR..];
    r[0] = match addr.ip() {
        IpAddr::V4(_) => nix::libc::AF_INET as u8,
        IpAddr::V6(_) => nix::libc::AF_INET6 as u8,
    };
    r[1] = nix::libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&TCP_LISTEN_BIT.to_ne_bytes());
    // inet_diag_sockid: sport and dport in network order, then src[4],
    // dst[4] (zero), the interface (zero) and the cookie (none).
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(a) => id[4..8].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => id[4..20].copy_from_slice(&a.octets()),
    }
    id[40..48].copy_from_slice(&[0xff; 8]);
    b
}

/// Reads the kernel's answer to the request numbered `seq`.
pub fn answer(buf: &[u8], seq: u32) -> io::Result<Answer> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {why}"));
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        let got_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDR || len > rest.len() {
            return Err(bad("truncated message"));
        }
        if got_seq == seq {
            return match kind {
                SOCK_DIAG_BY_FAMILY => Ok(Answer::Listening),
                NLMSG_ERROR => {
                    let code = rest
                        .get(NLMSG_HDR..NLMSG_HDR + 4)
                        .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                        .ok_or_else(|| bad("short error message"))?;
                    match -code {
                        ENOENT => Ok(Answer::Nobody),
                        0 => Err(bad("acknowledged without an answer")),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    }
                }
                other => Err(bad(&format!("unexpected message type {other}"))),
            };
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        rest = rest.get(step..).unwrap_or(&[]);
    }
    Err(bad("no answer to our request"))
}

/// Asks the kernel whether a TCP socket listens on `addr`, in this
/// process's network namespace.
pub fn ask(addr: SocketAddr) -> io::Result<Answer> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let timeout = nix::sys::time::TimeVal::new(0, ANSWER_WITHIN.as_micros() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    let seq = std::process::id();
    let req = request(addr, seq);
    use std::os::fd::AsRawFd;
    send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
    let mut buf = [0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    answer(&buf[..n], seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_request_names_the_local_end_only() {
        let r = request("10.1.2.3:8080".parse().unwrap(), 7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        let req = &r[16..];
        assert_eq!(req[0], nix::libc::AF_INET as u8);
        assert_eq!(req[1], 6);
        assert_eq!(&req[8..10], &8080u16.to_be_bytes());
        assert_eq!(&req[10..12], &[0, 0], "no remote port");
        assert_eq!(&req[12..16], &[10, 1, 2, 3]);
        assert!(
            req[28..48].iter().all(|b| *b == 0),
            "no remote address or interface"
        );
        assert_eq!(&req[48..56], &[0xff; 8], "no cookie");
        let v6 = request("[::]:80".parse().unwrap(), 1);
        assert_eq!(v6[16], nix::libc::AF_INET6 as u8);
        assert!(v6[16 + 12..16 + 28].iter().all(|b| *b == 0), "the wildcard");
    }

    #[test]
    fn answers_read_as_found_nobody_or_an_error() {
        assert_eq!(
            answer(&reply(20, 5, &[0u8; 72]), 5).unwrap(),
            Answer::Listening
        );
        let enoent = (-2i32).to_ne_bytes();
        assert_eq!(answer(&reply(2, 5, &enoent), 5).unwrap(), Answer::Nobody);
        let eperm = (-1i32).to_ne_bytes();
        assert_eq!(
            answer(&reply(2, 5, &eperm), 5).unwrap_err().raw_os_error(),
            Some(1)
        );
        // Someone else's message first, then ours.
        let mut two = reply(20, 4, &[0u8; 10]);
        while !two.len().is_multiple_of(4) {
            two.push(0);
        }
        two.extend(reply(2, 5, &enoent));
        assert_eq!(answer(&two, 5).unwrap(), Answer::Nobody);
        // Garbage is an error, never a panic.
        assert!(answer(&[1, 2, 3], 5).is_err());
        assert!(answer(&reply(2, 5, &[]), 5).is_err());
        let mut lying = reply(20, 5, &[]);
        lying[0] = 200;
        assert!(answer(&lying, 5).is_err());
        assert!(answer(&reply(3, 5, &[]), 5).is_err());
    }

    #[test]
    fn the_kernel_sees_a_listener_come_and_go() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(ask(addr).unwrap(), Answer::Listening);
        // A connected socket on the same port is not a listener.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        drop(l);
        assert_eq!(ask(addr).unwrap(), Answer::Nobody);
        let any = std::net::TcpListener::bind("[::]:0").unwrap();
        assert_eq!(ask(any.local_addr().unwrap()).unwrap(), Answer::Listening);
    }
}
