//! When a relay thread spins instead of sleeping in the kernel: the window
//! (off by default, `ENVOY_DOCKER_UDP_SPIN_US`), and the rules that keep
//! spinning to the moments it pays.

use nix::libc;
use std::time::{Duration, Instant};

/// How long a relay thread keeps asking for the next datagram, without
/// blocking, before it sleeps; see [`Pace`]. Off by default: a proxy on a
/// Docker host must not burn a CPU for latency nobody asked for.
pub(super) const SPIN: Duration = Duration::ZERO;
/// Sets `SPIN`, in microseconds (50 is a good value); 0 never spins.
pub const SPIN_ENV: &str = "ENVOY_DOCKER_UDP_SPIN_US";
/// A thread spins only after a datagram that came at most this long after
/// the one before: traffic that dense is likely to go on.
pub(super) const DENSE: Duration = Duration::from_micros(200);

pub(super) fn spin_window() -> Duration {
    std::env::var(SPIN_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_micros)
        .unwrap_or(SPIN)
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
pub(super) struct Pace {
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
pub(super) const MAX_BACKOFF: u32 = 63;

impl Pace {
    pub(super) fn new(window: Duration) -> Pace {
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
    pub(super) fn spin(&mut self) -> bool {
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
    pub(super) fn arrived(&mut self) {
        if self.spinning {
            self.backoff = 0; // a spin paid off
        }
        self.spinning = false;
        self.dense = self.done.elapsed() <= DENSE;
    }

    /// They have been relayed.
    pub(super) fn done(&mut self) {
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
    pub(super) fn nothing(&self) {
        // SAFETY: sched_yield has no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
    }
}
