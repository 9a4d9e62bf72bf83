//! What each connected Envoy holds, and the judgement that follows from
//! it for one mapping: its state, and whether its proxy must hand the port
//! over to Envoy or take it back.

use super::super::metrics::Metrics;
use super::entry::Entry;
use crate::mapping::{MappingState, Proto, Server};
use crate::protocol::Reply;
use crate::xds::session::Versions;
use crate::xds::snapshot::{Kind, Snapshot};
use std::collections::BTreeMap;
use std::time::Instant;

/// What one connected Envoy holds, name to version.
#[derive(Debug, Default)]
pub(super) struct EnvoyView {
    /// The xDS stream's number, as the log names it.
    pub stream: u64,
    /// Since when it has left a response unanswered past the deadline; it
    /// does not count towards hand-overs meanwhile.
    pub stalled: Option<Instant>,
    /// From its last LDS ACK or NACK (or its first request); `None` before.
    pub listeners: Option<Versions>,
    pub endpoints: Versions,
    /// `delta` or `sotw`, once the xDS server has said.
    pub flavor: Option<&'static str>,
}

impl EnvoyView {
    /// True if this Envoy serves `listener` as the snapshot has it now: the
    /// current listener, and the current endpoints of its cluster.
    pub fn serves(&self, snap: &Snapshot, listener: &str) -> bool {
        let Some(l) = snap.get(Kind::Listener).get(listener) else {
            return false;
        };
        let held_listener = self.listeners.as_ref().and_then(|m| m.get(listener));
        let endpoints_ok = match &l.cluster {
            Some(c) => snap
                .get(Kind::Endpoint)
                .get(c)
                .is_some_and(|e| self.endpoints.get(c) == Some(&e.version)),
            None => true,
        };
        held_listener == Some(&l.version) && endpoints_ok
    }

    /// False once this Envoy has said what it holds, without it; while it
    /// has not said, true unless it has stalled (a peer that never says
    /// must not keep proxies from taking their ports back).
    pub fn may_hold(&self, listener: &str) -> bool {
        match &self.listeners {
            Some(m) => m.contains_key(listener),
            None => self.stalled.is_none(),
        }
    }

    pub fn holds(&self, listener: &str) -> bool {
        self.listeners
            .as_ref()
            .is_some_and(|m| m.contains_key(listener))
    }
}

/// What a mapping is judged against.
pub(super) struct World<'a> {
    pub envoys: &'a BTreeMap<u64, EnvoyView>,
    /// The proxy connections that can take orders.
    pub links: &'a std::collections::BTreeSet<u64>,
    pub snap: &'a Snapshot,
    pub metrics: &'a Metrics,
    /// Still in the reconnect grace, with no Envoy seen yet.
    pub waiting_for_envoys: bool,
    /// The mappings whose ports the nftables table claims now; `None`
    /// when ports are not claimed at all. A port is handed over only once
    /// claimed, so that when `docker run` returns, an outside client's
    /// first connection already reaches Envoy, not Docker's DNAT.
    pub claimed: Option<&'a crate::nft::ruleset::Claims>,
}

/// Settles one mapping: its state from what the Envoys hold, and the order
/// for its proxy's connection if who should serve it changed. Pure: the
/// order is returned, not sent.
pub(super) fn judge(e: &mut Entry, w: &World) -> Option<(u64, Reply)> {
    let World {
        envoys,
        links,
        snap,
        metrics,
        waiting_for_envoys,
        claimed,
    } = *w;
    if e.mapping.key.proto != Proto::Tcp {
        e.state = MappingState::Active;
        return None;
    }
    let name = e.listener();
    // A stalled Envoy counts neither for nor against readiness.
    let mut answering = envoys.values().filter(|v| v.stalled.is_none());
    let served =
        envoys.values().any(|v| v.stalled.is_none()) && answering.all(|v| v.serves(snap, &name));
    if served {
        if let Some(since) = e.since.take() {
            metrics.ready_after(since.elapsed());
        }
        e.state = MappingState::Active;
    } else if e.state == MappingState::Active {
        e.state = MappingState::Pending;
    }
    let may_hold = waiting_for_envoys || envoys.values().any(|v| v.may_hold(&name));
    let claimed = claimed.is_none_or(|c| c.contains(&e.mapping.key));
    let order = match e.server {
        Server::Relay if served && claimed => Server::Envoy,
        Server::Handover | Server::Envoy if !may_hold => Server::Relay,
        _ => return None,
    };
    // Nobody to tell (a mapping recovered or replayed for a pid): what the
    // proxy does is unknown until it registers again.
    let conn = e.conn.filter(|c| links.contains(c))?;
    if order == Server::Relay {
        metrics.took_back();
        tracing::info!(
            "no Envoy serves {} any more; its proxy takes it back",
            e.mapping
        );
    }
    e.server = match order {
        Server::Envoy => Server::Handover,
        o => o,
    };
    Some((conn, Reply::Serve(order)))
}
