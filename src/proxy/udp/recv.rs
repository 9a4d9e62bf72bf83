//! Receiving in batches: `recvmmsg` into slots big enough for any datagram
//! or GRO train, with each message's sender and segment size.

use nix::libc;
use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Messages taken per `recvmmsg`: enough to spread a system call over many
/// datagrams under load; the buffers are touched only as far as datagrams
/// fill them.
/// The largest UDP payload over IPv4, and the most a relayed datagram
/// carries, as with docker-proxy.
pub const MAX_DATAGRAM: usize = 65507;

pub(super) const BATCH: usize = 32;
/// Bytes per receive slot: room for any UDP payload (65507 bytes over IPv4,
/// 65527 over IPv6) and for any GRO train, so nothing is ever truncated.
pub(super) const SLOT: usize = 65536;
/// Control bytes per received message: `UDP_GRO`'s int, and `IP_PKTINFO`,
/// which the sockets dockerd makes ask for, with room to spare.
pub(super) const CTRL: usize = 128;

/// Buffers and headers for `recvmmsg`.
pub(super) struct Receiver {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<Ctrl>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

/// One message's control buffer, aligned as cmsghdr needs.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(super) struct Ctrl(pub(super) [u8; CTRL]);

/// An all-zero msghdr: null pointers and zero lengths.
pub(super) fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (integers and raw pointers), for which
    // all zeroes is a valid value. Built so because musl's has private
    // padding fields.
    unsafe { std::mem::zeroed() }
}

impl Receiver {
    pub(super) fn new() -> Receiver {
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
    pub(super) fn recv(&mut self, fd: RawFd, flags: i32) -> io::Result<usize> {
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
    pub(super) fn source(&self, i: usize) -> Option<SocketAddr> {
        socket_addr(&self.names[i], self.hdrs[i].msg_hdr.msg_namelen)
    }

    /// Message i's bytes and, for a GRO train, its segment size (0 for a
    /// single datagram). None if it was truncated, which the slot size
    /// rules out.
    pub(super) fn message(&self, i: usize) -> Option<(&[u8], usize)> {
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
pub(super) fn gro_segment(ctrl: &[u8]) -> usize {
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
pub(super) fn socket_addr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
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
