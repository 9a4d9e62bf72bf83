//! Whether TCP registrations are arriving in a burst, such as the two
//! proxies per port that `docker run -p 20000-20999:20000-20999` starts.
//!
//! dockerd starts those proxies one after another and waits for each one's
//! `0\n`, so a starting proxy that waits for its hand-over (one round trip
//! through Envoy, more as Envoy holds more listeners) holds up every port
//! after it. In a burst the registrar therefore tells each newcomer to be
//! ready and relay at once (`Serve(Relay)`), and hands the ports over
//! afterwards, many per Envoy update. A few ports at a time (a container
//! publishing 80 and 443) still wait and are served by Envoy from their
//! first connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A burst: at least this many fresh TCP registrations ...
pub const COUNT: usize = 8;
/// ... within this long.
pub const WINDOW: Duration = Duration::from_millis(500);

/// The instants of the last [`COUNT`] fresh TCP registrations.
#[derive(Debug, Default)]
pub struct Burst {
    arrivals: VecDeque<Instant>,
}

impl Burst {
    /// Notes a fresh TCP registration at `now`; true if it is part of a
    /// burst (it and the [`COUNT`]` - 1` before it all came within
    /// [`WINDOW`]).
    pub fn arrived(&mut self, now: Instant) -> bool {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_ports_wait_and_a_range_goes_at_once_after_the_first_few() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Waiting proxies come about 15 ms apart: the first COUNT - 1 wait.
        for i in 0..COUNT as u64 - 1 {
            assert!(!b.arrived(ms(i * 15)), "registration {i}");
        }
        // From then on, every newcomer goes at once, however many follow.
        for i in COUNT as u64 - 1..2000 {
            assert!(b.arrived(ms(105 + i * 3)), "registration {i}");
        }
    }

    #[test]
    fn registrations_spread_out_are_no_burst() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        // A container every 300 ms with one port (two proxies) each.
        for i in 0..100u64 {
            let at = t0 + Duration::from_millis(i * 300);
            assert!(!b.arrived(at), "container {i}");
            assert!(
                !b.arrived(at + Duration::from_millis(15)),
                "container {i}, [::]"
            );
        }
    }

    #[test]
    fn a_burst_ends_when_registrations_thin_out() {
        let t0 = Instant::now();
        let mut b = Burst::default();
        for i in 0..20u64 {
            b.arrived(t0 + Duration::from_millis(i));
        }
        assert!(b.arrived(t0 + Duration::from_millis(20)));
        assert!(!b.arrived(t0 + Duration::from_secs(5)));
    }
}
