//! Sending in batches: datagrams to one destination grouped into
//! `UDP_SEGMENT` trains where the kernel and the route take them, and sent
//! with one `sendmmsg`, never blocking.

use super::recv::{empty_msghdr, Ctrl, Receiver};
use super::recv::{BATCH, CTRL, MAX_DATAGRAM};
use nix::libc;
use nix::sys::socket::{getsockopt, sockopt, SockaddrLike, SockaddrStorage};
use std::io;
use std::mem::size_of;
use std::net::UdpSocket as StdUdpSocket;
use std::os::fd::RawFd;

/// Segments in one `UDP_SEGMENT` send: the kernel's `UDP_MAX_SEGMENTS` is
/// 64 on older kernels and 128 on newer ones.
pub(super) const MAX_SEGMENTS: usize = 64;
/// The most bytes one `UDP_SEGMENT` send carries: the IPv4 payload limit,
/// which IPv6 also stays within.
pub(super) const MAX_TRAIN: usize = MAX_DATAGRAM;
/// Sends (datagrams or trains) per `sendmmsg`.
pub(super) const SEND_BATCH: usize = 64;

/// What this thread has learnt about `UDP_SEGMENT` on its sends.
pub(super) struct Gso {
    /// The largest segment size to try; 0 when the kernel lacks it.
    max: usize,
}

impl Gso {
    pub(super) fn probe(sock: &StdUdpSocket) -> Gso {
        let max = match getsockopt(sock, sockopt::UdpGsoSegment) {
            Ok(_) => MAX_TRAIN,
            Err(_) => 0,
        };
        Gso { max }
    }

    pub(super) fn allows(&self, seg: usize) -> bool {
        seg > 0 && seg <= self.max
    }

    /// Learns from a `UDP_SEGMENT` send with segment size `seg` that failed
    /// with `errno`; false if the error is not about segmentation.
    pub(super) fn failed(&mut self, seg: usize, errno: i32) -> bool {
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
pub(super) struct Unit {
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
pub(super) struct Sender {
    gso: Gso,
    fd: RawFd,
    dest: Option<SockaddrStorage>,
    units: Vec<Unit>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<Ctrl>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Sender {
    pub(super) fn new(gso: Gso) -> Sender {
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
    pub(super) fn relay(
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
    pub(super) fn push(&mut self, data: &[u8], gro: usize) {
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
    pub(super) fn flush(&mut self) {
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
    pub(super) fn send_one_by_one(&mut self, k: usize) {
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

pub(super) fn iovec(data: &[u8]) -> libc::iovec {
    libc::iovec {
        // The kernel only reads through it: these are sends.
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    }
}

/// Writes a `UDP_SEGMENT` control message for segment size `seg` into
/// `ctrl`; returns its length.
pub(super) fn segment_cmsg(ctrl: &mut Ctrl, seg: usize) -> usize {
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
