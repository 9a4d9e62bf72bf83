//! The relay against real sockets on loopback, and its parsing of control
//! messages.

use super::recv::{empty_msghdr, gro_segment, Ctrl, CTRL, SLOT};
use super::send::{iovec, segment_cmsg};
use super::*;
use nix::sys::socket::{getsockopt, SockaddrLike};
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
        100, 100, 100, 40, 100, 0, 0, 30, 30, 31, 1472, 1472, 1472, 9000, 9000, 5, 1, 65507, 200,
        200,
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
