//! Whether a TCP registration should relay at once instead of waiting
//! for its hand-over: the proxies that `docker run -p 20000-20999:20000-20999`
//! starts, or a container's second published port.
//!
//! dockerd starts a container's proxies one after another and waits for
//! each one's `0\n`, so a starting proxy that waits for its hand-over (one
//! round trip through Envoy, more as Envoy holds more listeners) holds up
//! every port after it. Two rules tell a newcomer to be ready and relay at
//! once (`Serve(Relay)`); its port is handed over afterwards, many per
//! Envoy update:
//! - a burst: [`COUNT`] fresh registrations within [`WINDOW`], whatever
//!   their containers (many containers started together);
//! - a sibling: the container (its address) registered another host port
//!   within [`SIBLING_WINDOW`]. A container's first port, its IPv4
//!   and IPv6 proxies, still waits and is served by Envoy from its first
//!   connection; the rest follow without holding dockerd up. The window
//!   is a time, not a count, so a slow Envoy (a long wait for each of the
//!   first proxies) cannot keep a range from qualifying.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A burst: at least this many fresh TCP registrations ...
pub const COUNT: usize = 8;
/// ... within this long.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Another host port for the same container within this long makes a
/// sibling.
pub const SIBLING_WINDOW: Duration = Duration::from_secs(2);
/// Containers remembered before the stale ones are dropped.
const CONTAINERS_KEPT: usize = 1024;

#[derive(Debug, Default)]
pub struct Burst {
    /// The instants of the last [`COUNT`] fresh TCP registrations.
    arrivals: VecDeque<Instant>,
    /// Per container address: the host port it registered first, and when
    /// it last registered any. A port's IPv4 and IPv6 proxies share both.
    containers: HashMap<IpAddr, (u16, Instant)>,
}

impl Burst {
    /// Notes a fresh TCP registration of `host_port` for the container at
    /// `container` at `now`; true if it should relay at once (see the
    /// module's rules).
    pub fn arrived(&mut self, now: Instant, container: IpAddr, host_port: u16) -> bool {
        let burst = self.rate(now);
        let sibling = self.sibling(now, container, host_port);
        burst || sibling
    }

    fn rate(&mut self, now: Instant) -> bool {
        if self.arrivals.len() == COUNT {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(now);
        self.arrivals.len() == COUNT
            && self
                .arrivals
                .front()
                .is_some_and(|first| now.saturating_duration_since(*first) <= WINDOW)
    }

    fn sibling(&mut self, now: Instant, container: IpAddr, host_port: u16) -> bool {
        let fresh = |at: Instant| now.saturating_duration_since(at) <= SIBLING_WINDOW;
        if self.containers.len() >= CONTAINERS_KEPT {
            self.containers.retain(|_, (_, at)| fresh(*at));
        }
        let (port, at) = self.containers.entry(container).or_insert((host_port, now));
        if !fresh(*at) {
            *port = host_port;
        }
        *at = now;
        *port != host_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Container number `c`'s address and a host port.
    fn be(c: u32, port: u16) -> (IpAddr, u16) {
        let [_, a, b, d] = (0x0a00_0000 + c).to_be_bytes();
        (IpAddr::from([10, a, b, d]), port)
    }

    impl Burst {
        fn at(&mut self, now: Instant, (ip, port): (IpAddr, u16)) -> bool {
            self.arrived(now, ip, port)
        }
    }

    #[test]
    fn a_containers_first_port_waits_and_the_rest_of_its_range_goes_at_once() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Port 80's IPv4 and IPv6 proxies wait, however slow Envoy is.
        assert!(!b.at(ms(0), be(1, 80)));
        assert!(!b.at(ms(400), be(1, 80)));
        // Every later port goes at once, in both families.
        for (i, port) in (81..1080).enumerate() {
            let at = ms(800 + i as u64 * 6);
            assert!(b.at(at, be(1, port)), "port {port}");
            assert!(b.at(at + Duration::from_millis(3), be(1, port)));
        }
    }

    #[test]
    fn many_containers_started_together_make_a_burst() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // One port each, so no sibling: the first COUNT - 1 wait.
        for c in 0..COUNT as u32 - 1 {
            assert!(!b.at(ms(c as u64 * 15), be(c, 80)), "container {c}");
        }
        for c in COUNT as u32 - 1..500 {
            assert!(b.at(ms(105 + c as u64 * 3), be(c, 80)), "container {c}");
        }
    }

    #[test]
    fn containers_with_one_port_spread_out_always_wait() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        // A container every 300 ms with one port (two proxies) each.
        for c in 0..100u32 {
            let at = t0 + Duration::from_millis(c as u64 * 300);
            assert!(!b.at(at, be(c, 80)), "container {c}");
            assert!(
                !b.at(at + Duration::from_millis(15), be(c, 80)),
                "container {c}, [::]"
            );
        }
    }

    #[test]
    fn a_burst_ends_when_registrations_thin_out() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        for c in 0..20u32 {
            b.at(t0 + Duration::from_millis(c as u64), be(c, 80));
        }
        assert!(b.at(t0 + Duration::from_millis(20), be(20, 80)));
        assert!(!b.at(t0 + Duration::from_secs(5), be(21, 80)));
    }

    #[test]
    fn an_address_used_again_later_is_a_new_container() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        assert!(!b.at(t0, be(1, 80)));
        assert!(b.at(t0 + Duration::from_millis(10), be(1, 443)));
        // Docker hands the address to another container after a while: its
        // first port waits again.
        let later = t0 + SIBLING_WINDOW + Duration::from_secs(1);
        assert!(!b.at(later, be(1, 8080)));
        assert!(b.at(later + Duration::from_millis(10), be(1, 80)));
    }

    #[test]
    fn stale_containers_are_forgotten() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        for c in 0..10 * CONTAINERS_KEPT as u32 {
            let at = t0 + SIBLING_WINDOW * c / 100;
            b.at(at, be(c, 80));
        }
        assert!(
            b.containers.len() <= CONTAINERS_KEPT,
            "{}",
            b.containers.len()
        );
    }
}
