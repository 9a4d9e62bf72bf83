//! Who serves a TCP port, as the proxy sees it: a pure state machine that
//! turns events (the start-up deadline, the registrar unreachable, the
//! registrar's `Serve` orders) into actions for `proxy::serve` to carry out.
//! It does no I/O, so its rules are unit-tested here.
//!
//! The rules, in short:
//! - the proxy starts holding the port's socket without accepting on it;
//!   connections queue in the kernel;
//! - readiness (`0\n` on fd 3) comes exactly once: on the hand-over order
//!   if it arrives first, else at the deadline or as soon as the registrar
//!   is known to be unreachable, and then the proxy relays;
//! - hand over: stop accepting and close the socket; the kernel moves the
//!   connections still queued to Envoy's sockets in the same reuse-port
//!   group (`tcp_migrate_req`), and relayed connections run on;
//! - take back: bind a fresh reuse-port socket and relay again, on the
//!   registrar's order, or by itself when the registrar is gone and no
//!   socket listens on the port any more (Envoy died with it).

use crate::mapping::Server;

/// Where the proxy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Holding the socket, not ready yet, not accepting.
    Starting,
    /// Ready; accepting and relaying.
    Relay,
    /// Ready; the socket is closed and Envoy alone serves.
    Envoy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The start-up bound passed without a hand-over.
    Deadline,
    /// The registrar cannot be reached at all (no socket, refused).
    Unreachable,
    /// The registrar's order.
    Serve(Server),
    /// The registrar is gone, and the kernel says no socket listens on the
    /// port: whoever served it has died too.
    Unserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write `0\n` on fd 3.
    Ready,
    /// Accept and relay: on the socket held since start-up, or on a fresh
    /// reuse-port socket if it was closed.
    Relay,
    /// Stop accepting and close the socket.
    Close,
    /// Tell the registrar who serves now.
    Report(Server),
}

#[derive(Debug)]
pub struct Handover {
    phase: Phase,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            phase: Phase::Starting,
        }
    }
}

impl Handover {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Who serves, as the proxy tells the registrar: a starting proxy
    /// counts as relaying, since Envoy does not serve it yet.
    pub fn server(&self) -> Server {
        match self.phase {
            Phase::Envoy => Server::Envoy,
            Phase::Starting | Phase::Relay => Server::Relay,
        }
    }

    /// Takes one event; returns what to do, in order.
    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        use Action::*;
        let (next, actions) = match (self.phase, ev) {
            (Phase::Starting, Event::Serve(Server::Envoy)) => {
                (Phase::Envoy, vec![Ready, Close, Report(Server::Envoy)])
            }
            (Phase::Starting, Event::Deadline | Event::Unreachable)
            | (Phase::Starting, Event::Serve(Server::Relay | Server::Handover)) => {
                (Phase::Relay, vec![Ready, Relay, Report(Server::Relay)])
            }
            (Phase::Relay, Event::Serve(Server::Envoy)) => {
                (Phase::Envoy, vec![Close, Report(Server::Envoy)])
            }
            (Phase::Envoy, Event::Serve(Server::Relay | Server::Handover) | Event::Unserved) => {
                (Phase::Relay, vec![Relay, Report(Server::Relay)])
            }
            // An order that matches what the proxy does already: confirm
            // it, so that the registrar's view settles.
            (p, Event::Serve(_)) => (p, vec![Report(self.server())]),
            // Deadlines and reachability only matter while starting; a
            // proxy that holds its socket needs nobody else to listen.
            (p, Event::Deadline | Event::Unreachable | Event::Unserved) => (p, vec![]),
        };
        self.phase = next;
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    #[test]
    fn a_quick_envoy_gets_the_port_before_ready_and_the_proxy_never_relays() {
        let mut h = Handover::default();
        assert_eq!(
            h.on(Event::Serve(Server::Envoy)),
            [Ready, Close, Report(Server::Envoy)]
        );
        // The deadline that follows changes nothing, and ready is not sent twice.
        assert_eq!(h.on(Event::Deadline), []);
        assert_eq!(h.phase(), Phase::Envoy);
    }

    #[test]
    fn no_envoy_in_time_means_ready_and_relay_then_a_later_handover() {
        let mut h = Handover::default();
        assert_eq!(h.on(Event::Deadline), [Ready, Relay, Report(Server::Relay)]);
        assert_eq!(h.on(Event::Unreachable), []);
        assert_eq!(
            h.on(Event::Serve(Server::Envoy)),
            [Close, Report(Server::Envoy)]
        );
        assert_eq!(h.server(), Server::Envoy);
    }

    #[test]
    fn an_unreachable_registrar_means_ready_at_once() {
        let mut h = Handover::default();
        assert_eq!(
            h.on(Event::Unreachable),
            [Ready, Relay, Report(Server::Relay)]
        );
        assert_eq!(h.phase(), Phase::Relay);
    }

    #[test]
    fn takeback_and_second_handover() {
        let mut h = Handover::default();
        h.on(Event::Serve(Server::Envoy));
        assert_eq!(
            h.on(Event::Serve(Server::Relay)),
            [Relay, Report(Server::Relay)]
        );
        // A repeated order is only confirmed.
        assert_eq!(h.on(Event::Serve(Server::Relay)), [Report(Server::Relay)]);
        assert_eq!(
            h.on(Event::Serve(Server::Envoy)),
            [Close, Report(Server::Envoy)]
        );
        assert_eq!(h.on(Event::Serve(Server::Envoy)), [Report(Server::Envoy)]);
    }

    #[test]
    fn an_empty_port_is_taken_back_without_an_order_but_only_after_hand_over() {
        let mut h = Handover::default();
        assert_eq!(h.on(Event::Unserved), []);
        assert_eq!(h.phase(), Phase::Starting);
        h.on(Event::Deadline);
        assert_eq!(h.on(Event::Unserved), [], "a relaying proxy listens itself");
        h.on(Event::Serve(Server::Envoy));
        assert_eq!(h.on(Event::Unserved), [Relay, Report(Server::Relay)]);
        assert_eq!(h.phase(), Phase::Relay);
        // The registrar back, Envoy back: a normal hand-over again.
        assert_eq!(
            h.on(Event::Serve(Server::Envoy)),
            [Close, Report(Server::Envoy)]
        );
    }

    #[test]
    fn a_take_back_order_while_starting_makes_the_proxy_ready_and_relay() {
        let mut h = Handover::default();
        assert_eq!(
            h.on(Event::Serve(Server::Relay)),
            [Ready, Relay, Report(Server::Relay)]
        );
    }
}
