//! The registry's journal: the last things that happened (hand-overs,
//! take-backs, NACKs, Envoys, Docker and etcd), newest last, for the
//! dashboard's events and each mapping's page. Bounded rings: the whole
//! journal keeps [`KEPT`] events and each mapping its last [`PER_MAPPING`].

use crate::mapping::MappingKey;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

/// Events the journal keeps in all.
pub const KEPT: usize = 200;
/// Events each mapping keeps of its own.
pub const PER_MAPPING: usize = 20;

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Register,
    Remove,
    Handover,
    Takeback,
    Nack,
    Envoy,
    Docker,
    Etcd,
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: Kind,
    /// The mapping it is about, as Envoy names it (its listener).
    pub mapping: Option<String>,
    pub text: String,
}

impl Event {
    pub fn new(kind: Kind, mapping: Option<&MappingKey>, text: impl Into<String>) -> Event {
        Event {
            at_ms: now_ms(),
            kind,
            mapping: mapping.map(MappingKey::resource_name),
            text: text.into(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A ring of events that keeps the newest `cap`.
#[derive(Debug, Clone)]
pub struct Ring {
    cap: usize,
    events: VecDeque<Event>,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            cap,
            events: VecDeque::new(),
        }
    }

    pub fn push(&mut self, e: Event) {
        if self.events.len() == self.cap {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Newest first.
    pub fn newest_first(&self) -> Vec<Event> {
        self.events.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_the_newest_and_gives_them_newest_first() {
        let mut r = Ring::new(3);
        for i in 0..5 {
            r.push(Event::new(Kind::Docker, None, format!("e{i}")));
        }
        let texts: Vec<String> = r.newest_first().into_iter().map(|e| e.text).collect();
        assert_eq!(texts, ["e4", "e3", "e2"]);
    }

    #[test]
    fn events_name_their_mapping_as_envoy_does_and_serialize_lowercase() {
        let key = MappingKey {
            proto: crate::mapping::Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
        };
        let e = Event::new(Kind::Takeback, Some(&key), "x");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "takeback");
        assert_eq!(v["mapping"], "tcp_0-0-0-0_8080");
        assert!(e.at_ms > 1_600_000_000_000);
    }
}
