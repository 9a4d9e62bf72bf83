//! The per-stream xDS state machine, for state-of-the-world and delta ADS
//! alike, with no I/O: the server feeds it Envoy's requests and new
//! snapshots, and sends what `poll` returns.
//!
//! What it guarantees:
//! - One response in flight per type; the next waits for the ACK or NACK.
//! - Make-before-break: clusters go first, then endpoints, then listeners.
//!   Envoy ACKs a cluster only once it is warm, which needs its endpoints,
//!   so endpoints go out without waiting for that ACK. A new listener is
//!   only sent once Envoy has ACKed both its cluster and an assignment sent
//!   after that cluster, so its first connection never meets a warming
//!   cluster. Until then an older version of the listener (if Envoy has
//!   one) is kept.
//! - A cluster stays while a listener Envoy still holds points at it, and
//!   is removed once that listener is gone.
//! - Stale nonces are ignored; NACKs are told apart by `error_detail`.
//! - On reconnect, what Envoy says it holds (SotW `version_info`, delta
//!   `initial_resource_versions`) is taken into account, so a restarted
//!   registrar with the same state pushes nothing new.

use super::resources::{content_hash, Resource};
use super::snapshot::{Kind, Resources, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Sotw,
    Delta,
}

/// A request, normalized across the two flavors.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub nonce: String,
    pub error: Option<String>,
    /// SotW: the version Envoy holds; empty on a first start.
    pub version_info: String,
    /// SotW: the full list of names wanted (empty = wildcard for CDS/LDS).
    pub names: Vec<String>,
    /// Delta: names added to and removed from the subscription.
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
    /// Delta: what Envoy already holds when it (re)connects.
    pub initial_versions: BTreeMap<String, String>,
}

/// A response, normalized across the two flavors.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: Kind,
    pub nonce: String,
    pub version: String,
    /// SotW: every resource of the type. Delta: only new or changed ones.
    pub resources: Vec<Arc<Resource>>,
    /// Delta only: names Envoy must drop.
    pub removed: Vec<String>,
}

/// Name to version, as Envoy holds it. Persistent, so handing a copy to
/// the registrar on every ACK costs O(1).
pub type Versions = imbl::OrdMap<String, String>;

/// What an ACK or NACK (or a first request) tells the registrar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub kind: Kind,
    /// What Envoy now holds, name to version, as far as this stream knows.
    pub held: Versions,
    /// Set for a NACK: Envoy's error text.
    pub error: Option<String>,
    /// The names this answer was about (what the answered response added,
    /// changed or removed); `None` when it may be about anything (a first
    /// request, which reports all Envoy holds).
    pub touched: Option<Vec<String>>,
}

/// A resource Envoy holds or is being sent. `res` is `None` when Envoy had
/// it before this stream began, so only its version is known.
#[derive(Debug, Clone)]
struct Held {
    version: String,
    res: Option<Arc<Resource>>,
}

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Answer even if nothing differs (Envoy waits for a first response).
    must_respond: bool,
    last_nonce: Option<String>,
    pending: Option<String>,
    /// The names the pending response added, changed or removed.
    inflight: Vec<String>,
    /// Something this type's response depends on may have changed since
    /// it was last worked out; `poll` skips clean types.
    dirty: bool,
    sent: BTreeMap<String, Held>,
    acked: Versions,
    /// Versions Envoy refused: never counted as held, never resent as such.
    rejected: BTreeMap<String, String>,
    /// Endpoints only: clusters sent anew, which wait for a fresh
    /// assignment whatever Envoy says it holds.
    fresh_needed: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Session {
    flavor: Flavor,
    snap: Arc<Snapshot>,
    types: [TypeState; 3],
    nonces: u64,
    /// SotW reconnect with unknown contents: Envoy already has listeners we
    /// cannot name, so the first LDS response is sent without warming gates.
    trust_listeners: bool,
    /// Set by the first LDS ACK on this stream. Until then, clusters Envoy
    /// said it held on reconnect may still serve listeners whose contents
    /// we do not know, so they are not removed.
    listeners_confirmed: bool,
}

/// Envoy's NACK text, cut to its first line: for a rejected filter, Envoy
/// appends the whole configuration, which helps nobody on fd 3.
pub fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim_end();
    let mut out: String = line.chars().take(500).collect();
    if out.len() < line.len() || text.trim_end().contains('\n') {
        out.push_str(" [...]");
    }
    out
}

/// True if `text` names `name` as a whole word of `[A-Za-z0-9_-]`.
pub fn mentions(text: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

impl Session {
    pub fn new(flavor: Flavor, snap: Arc<Snapshot>) -> Session {
        Session {
            flavor,
            snap,
            types: Default::default(),
            nonces: 0,
            trust_listeners: false,
            listeners_confirmed: false,
        }
    }

    /// True while a response sent on this stream has had no ACK or NACK.
    pub fn awaiting(&self) -> bool {
        self.types.iter().any(|t| t.pending.is_some())
    }

    /// True while this stream's Envoy does not hold the listeners of the
    /// current snapshot: a response is out, or listeners are not sent yet
    /// (their clusters are warming, or the peer never asked for them), or
    /// removals are not ACKed. Refused versions count as answered.
    pub fn lagging(&self) -> bool {
        if self.awaiting() {
            return true;
        }
        let ts = &self.types[Kind::Listener as usize];
        if !ts.subscribed {
            return true;
        }
        let want = self.snap.get(Kind::Listener);
        want.iter().any(|(name, r)| {
            ts.acked.get(name) != Some(&r.version) && ts.rejected.get(name) != Some(&r.version)
        }) || ts.acked.keys().any(|n| !want.contains_key(n))
    }

    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        let changed = Kind::ORDER
            .iter()
            .any(|k| !self.snap.get(*k).ptr_eq(snap.get(*k)));
        if changed {
            // The types depend on each other (warming, clusters in use):
            // any change may touch all three.
            self.mark(&Kind::ORDER);
        }
        self.snap = snap;
    }

    fn mark(&mut self, kinds: &[Kind]) {
        for k in kinds {
            self.types[*k as usize].dirty = true;
        }
    }

    fn ts(&mut self, kind: Kind) -> &mut TypeState {
        &mut self.types[kind as usize]
    }

    /// Takes one request; returns what an ACK or NACK in it means.
    pub fn on_request(&mut self, kind: Kind, req: Incoming) -> Option<Feedback> {
        // What a request of this type can unblock or change: its own next
        // response, listeners waiting for warm clusters, clusters still
        // kept for listeners Envoy holds, assignments of sent clusters.
        self.mark(match kind {
            Kind::Cluster => &Kind::ORDER,
            Kind::Endpoint => &[Kind::Endpoint, Kind::Listener],
            Kind::Listener => &[Kind::Listener, Kind::Cluster],
        });
        let first = !self.types[kind as usize].subscribed;
        match self.flavor {
            Flavor::Sotw => {
                let ts = &self.types[kind as usize];
                if !req.nonce.is_empty() && ts.last_nonce.as_deref() != Some(req.nonce.as_str()) {
                    return None; // stale: a newer response is on its way
                }
                if first {
                    self.first_sotw(kind, &req);
                }
                let ts = self.ts(kind);
                ts.names = req.names.iter().cloned().collect();
                ts.wildcard = kind != Kind::Endpoint && ts.names.is_empty();
            }
            Flavor::Delta => {
                let ts = self.ts(kind);
                if first {
                    ts.subscribed = true;
                    ts.wildcard = kind != Kind::Endpoint && req.subscribe.is_empty();
                    ts.must_respond = req.initial_versions.is_empty();
                    for (name, version) in &req.initial_versions {
                        ts.acked.insert(name.clone(), version.clone());
                        ts.sent.insert(
                            name.clone(),
                            Held {
                                version: version.clone(),
                                res: None,
                            },
                        );
                    }
                }
                for name in &req.subscribe {
                    if name == "*" {
                        ts.wildcard = true;
                    } else {
                        ts.names.insert(name.clone());
                    }
                }
                for name in &req.unsubscribe {
                    if name == "*" {
                        ts.wildcard = false;
                    }
                    ts.names.remove(name);
                    ts.sent.remove(name);
                    ts.acked.remove(name);
                }
            }
        }
        if first && kind == Kind::Endpoint {
            // Clusters sent anew on this stream need their assignment again,
            // even if Envoy reports holding it.
            let ts = self.ts(kind);
            for name in std::mem::take(&mut ts.fresh_needed) {
                ts.sent.remove(&name);
                ts.acked.remove(&name);
                ts.fresh_needed.insert(name);
            }
        }
        let ts = self.ts(kind);
        if req.nonce.is_empty() || ts.pending.as_deref() != Some(req.nonce.as_str()) {
            // A first request tells what Envoy already holds, which the
            // registry needs even when nothing has to be sent.
            return first.then(|| Feedback {
                kind,
                held: ts.acked.clone(),
                error: None,
                touched: None,
            });
        }
        ts.pending = None;
        let touched = std::mem::take(&mut ts.inflight);
        let before = std::mem::take(&mut ts.acked);
        let mut failed: Vec<String> = match &req.error {
            None => Vec::new(),
            Some(e) => ts.sent.keys().filter(|n| mentions(e, n)).cloned().collect(),
        };
        if req.error.is_some() && failed.is_empty() {
            // The error names nothing: take it that everything this response
            // changed was refused.
            failed = ts
                .sent
                .iter()
                .filter(|(n, h)| before.get(*n) != Some(&h.version))
                .map(|(n, _)| n.clone())
                .collect();
        }
        for name in &failed {
            if let Some(h) = ts.sent.remove(name) {
                ts.rejected.insert(name.clone(), h.version);
            }
            // Envoy keeps what it had before, if anything.
            if let Some(old) = before.get(name) {
                let held = Held {
                    version: old.clone(),
                    res: None,
                };
                ts.sent.insert(name.clone(), held);
            }
        }
        ts.acked = ts
            .sent
            .iter()
            .map(|(n, h)| (n.clone(), h.version.clone()))
            .collect();
        let acked = &ts.acked;
        ts.rejected.retain(|n, v| acked.get(n) != Some(v));
        if kind == Kind::Listener && req.error.is_none() {
            self.listeners_confirmed = true;
        }
        let ts = self.ts(kind);
        Some(Feedback {
            kind,
            held: ts.acked.clone(),
            error: req.error.as_deref().map(first_line),
            touched: Some(touched),
        })
    }

    fn first_sotw(&mut self, kind: Kind, req: &Incoming) {
        let names: BTreeSet<String> = req.names.iter().cloned().collect();
        let ts = self.ts(kind);
        ts.subscribed = true;
        ts.names = names;
        ts.wildcard = kind != Kind::Endpoint && ts.names.is_empty();
        if req.version_info.is_empty() {
            ts.must_respond = true;
            return;
        }
        // Envoy is reconnecting. If it holds exactly what we would send,
        // take that as acknowledged; otherwise answer in full.
        let desired = self.desired(kind, true);
        if sotw_version(&desired) == req.version_info {
            let ts = self.ts(kind);
            for (name, res) in desired {
                ts.acked.insert(name.clone(), res.version.clone());
                ts.sent.insert(
                    name,
                    Held {
                        version: res.version.clone(),
                        res: Some(res),
                    },
                );
            }
        } else {
            self.ts(kind).must_respond = true;
            if kind == Kind::Listener {
                self.trust_listeners = true;
            }
        }
    }

    /// Everything that can be sent now, in make-before-break order.
    pub fn poll(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for kind in Kind::ORDER {
            let busy = |k: Kind| self.types[k as usize].pending.is_some();
            let ts = &self.types[kind as usize];
            let blocked = match kind {
                Kind::Cluster => false,
                // Envoy ACKs clusters only once they are warm, which needs
                // their endpoints: EDS must not wait for that ACK.
                Kind::Endpoint => false,
                Kind::Listener => busy(Kind::Cluster) || busy(Kind::Endpoint),
            };
            if !ts.dirty || !ts.subscribed || ts.pending.is_some() || blocked {
                continue;
            }
            let desired = self.desired(kind, self.trust_listeners);
            self.ts(kind).dirty = false;
            if let Some(msg) = self.respond(kind, desired) {
                out.push(msg);
                // Clusters sent decide which assignments are due; listeners
                // sent decide which clusters are still in use.
                match kind {
                    Kind::Cluster => self.mark(&[Kind::Endpoint]),
                    Kind::Listener => self.mark(&[Kind::Cluster]),
                    Kind::Endpoint => {}
                }
            }
        }
        out
    }

    fn respond(&mut self, kind: Kind, desired: Resources) -> Option<Outgoing> {
        let flavor = self.flavor;
        let ts = &self.types[kind as usize];
        let changed: Vec<Arc<Resource>> = desired
            .values()
            .filter(|r| ts.sent.get(&r.name).map(|h| &h.version) != Some(&r.version))
            .filter(|r| ts.rejected.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let removed: Vec<String> = ts
            .sent
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() && !ts.must_respond {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        // SotW versions name the whole set (a hash of it, so a reconnect
        // can tell); delta's is informative only, so no hash over all.
        let version = match flavor {
            Flavor::Sotw => sotw_version(&desired),
            Flavor::Delta => format!("n{nonce}"),
        };
        let ts = self.ts(kind);
        ts.must_respond = false;
        ts.pending = Some(nonce.clone());
        ts.inflight = changed
            .iter()
            .map(|r| r.name.clone())
            .chain(removed.iter().cloned())
            .collect();
        ts.last_nonce = Some(nonce.clone());
        let old_sent = std::mem::take(&mut ts.sent);
        ts.sent = desired
            .iter()
            .map(|(n, r)| {
                // A placeholder stays what it was: held, contents unknown.
                let res = (!r.any.type_url.is_empty()).then(|| r.clone());
                let version = r.version.clone();
                (n.clone(), Held { version, res })
            })
            .collect();
        if flavor == Flavor::Delta {
            // A refused version that was not sent again is not Envoy's.
            for (name, version) in &ts.rejected {
                if ts.sent.get(name).map(|h| &h.version) == Some(version) {
                    match old_sent.get(name) {
                        Some(h) => ts.sent.insert(name.clone(), h.clone()),
                        None => ts.sent.remove(name),
                    };
                }
            }
        }
        if kind == Kind::Listener {
            self.trust_listeners = false;
        }
        if kind == Kind::Cluster {
            // A cluster Envoy (re)builds waits for a fresh assignment, even
            // an unchanged one: forget that one was ever sent.
            let eds = self.ts(Kind::Endpoint);
            for r in &changed {
                eds.sent.remove(&r.name);
                eds.acked.remove(&r.name);
                eds.fresh_needed.insert(r.name.clone());
            }
        }
        if kind == Kind::Endpoint {
            let ts = self.ts(kind);
            for name in desired.keys() {
                ts.fresh_needed.remove(name);
            }
        }
        Some(match flavor {
            Flavor::Sotw => Outgoing {
                kind,
                nonce,
                version,
                resources: desired.values().cloned().collect(),
                removed: Vec::new(),
            },
            Flavor::Delta => Outgoing {
                kind,
                nonce,
                version,
                resources: changed,
                removed,
            },
        })
    }

    /// What Envoy should hold of `kind` right now.
    fn desired(&self, kind: Kind, trust_listeners: bool) -> Resources {
        let snap = self.snap.get(kind);
        let ts = &self.types[kind as usize];
        match kind {
            Kind::Cluster => {
                let mut out = snap.clone();
                // The clusters that listeners Envoy holds point at, once.
                let used: BTreeSet<&str> = self.types[Kind::Listener as usize]
                    .sent
                    .values()
                    .filter_map(|l| l.res.as_ref()?.cluster.as_deref())
                    .collect();
                for (name, held) in &ts.sent {
                    let still_used = used.contains(name.as_str());
                    if let (false, Some(res), true) =
                        (out.contains_key(name), &held.res, still_used)
                    {
                        out.insert(name.clone(), res.clone());
                    }
                    // Held from before this stream, contents unknown: keep it
                    // (unchanged, so nothing is sent) until Envoy has ACKed
                    // listeners that no longer need it.
                    let keep = self.flavor == Flavor::Delta && !self.listeners_confirmed;
                    if keep && held.res.is_none() && !out.contains_key(name) {
                        out.insert(
                            name.clone(),
                            Arc::new(Resource::placeholder(name, &held.version)),
                        );
                    }
                }
                out
            }
            Kind::Endpoint => {
                let clusters = &self.types[Kind::Cluster as usize].sent;
                let wanted = |n: &String| ts.wildcard || ts.names.contains(n);
                let mut out: Resources = snap
                    .iter()
                    .filter(|(n, _)| wanted(n))
                    .map(|(n, r)| (n.clone(), r.clone()))
                    .collect();
                for (name, held) in &ts.sent {
                    if let (false, Some(res), true) = (
                        out.contains_key(name),
                        &held.res,
                        clusters.contains_key(name),
                    ) {
                        if wanted(name) {
                            out.insert(name.clone(), res.clone());
                        }
                    }
                }
                // A cluster Envoy has but we have no endpoints for (its
                // mapping went away before Envoy asked) gets an empty
                // assignment, or it would warm until Envoy's 15 s timeout.
                // Envoy asks for assignments of EDS clusters only.
                for name in clusters.keys() {
                    if wanted(name) && !out.contains_key(name) {
                        let empty = super::resources::no_endpoints(name);
                        out.insert(name.clone(), Arc::new(empty));
                    }
                }
                out
            }
            Kind::Listener => {
                let mut out = Resources::new();
                for (name, res) in snap {
                    let held = ts.sent.get(name);
                    let ready = trust_listeners
                        || held.is_some_and(|h| h.version == res.version || h.res.is_none())
                        || res.cluster.as_ref().is_none_or(|c| self.warm(c));
                    if ready {
                        out.insert(name.clone(), res.clone());
                    } else if let Some(old) = held.and_then(|h| h.res.clone()) {
                        out.insert(name.clone(), old);
                    }
                }
                out
            }
        }
    }

    /// True once Envoy has ACKed the cluster's current version and then an
    /// assignment for it, so the cluster is active.
    fn warm(&self, cluster: &str) -> bool {
        let acked = |k: Kind| {
            let want = self.snap.get(k).get(cluster).map(|r| &r.version);
            want.is_some() && self.types[k as usize].acked.get(cluster) == want
        };
        acked(Kind::Cluster) && acked(Kind::Endpoint)
    }
}

/// The SotW version of a set: a hash of every name and version in it.
fn sotw_version(set: &Resources) -> String {
    let parts: Vec<&[u8]> = set
        .values()
        .flat_map(|r| [r.name.as_bytes(), r.version.as_bytes()])
        .collect();
    content_hash(&parts)
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
