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

use super::resource::{content_hash, Resource};
use super::snapshot::{Kind, Resources, Snapshot};
use imbl::ordmap::DiffItem;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Endpoints: names whose subscription changed since `desired` last
    /// looked, and whether it must look at every name (first time, or the
    /// wildcard was switched).
    names_changed: BTreeSet<String>,
    full: bool,
    /// Endpoints: the clusters sent when `desired` last looked.
    seen_clusters: Resources,
    /// Answer even if nothing differs (Envoy waits for a first response).
    must_respond: bool,
    last_nonce: Option<String>,
    pending: Option<String>,
    /// The names the pending response added, changed or removed.
    inflight: Vec<String>,
    /// Something this type's response depends on may have changed since
    /// it was last worked out; `poll` skips clean types.
    dirty: bool,
    /// What Envoy holds or is being sent. A placeholder stands for what
    /// Envoy had before this stream began (only its version is known).
    /// Built from the snapshot plus a few exceptions, so it shares nearly
    /// all of its nodes with the snapshot and the two diff in time
    /// proportional to what differs.
    sent: Resources,
    /// `sent` as it was at the last ACK, and the same as name to version.
    acked_res: Resources,
    acked: Versions,
    /// Versions Envoy refused: never counted as held, never resent as such.
    rejected: BTreeMap<String, String>,
    /// Endpoints only: clusters sent anew, which wait for a fresh
    /// assignment whatever Envoy says it holds.
    fresh_needed: BTreeSet<String>,
}

impl TypeState {
    /// Forgets that Envoy holds `name` (it must be sent again).
    fn forget(&mut self, name: &str) {
        self.sent.remove(name);
        self.acked_res.remove(name);
        self.acked.remove(name);
    }

    /// Takes `sent` as acknowledged; O(what changed since the last ACK).
    fn take_ack(&mut self) {
        for item in self.acked_res.diff(&self.sent) {
            match item {
                DiffItem::Add(n, r) | DiffItem::Update { new: (n, r), .. } => {
                    self.acked.insert(n.clone(), r.version.clone());
                }
                DiffItem::Remove(n, _) => {
                    self.acked.remove(n);
                }
            }
        }
        self.acked_res = self.sent.clone();
        let acked = &self.acked;
        self.rejected.retain(|n, v| acked.get(n) != Some(v));
    }
}

#[derive(Debug)]
pub struct Session {
    flavor: Flavor,
    snap: Arc<Snapshot>,
    types: [TypeState; 4],
    nonces: u64,
    /// SotW reconnect with unknown contents: Envoy already has listeners we
    /// cannot name, so the first LDS response is sent without warming gates.
    trust_listeners: bool,
    /// Set by the first LDS ACK on this stream. Until then, clusters Envoy
    /// said it held on reconnect may still serve listeners whose contents
    /// we do not know, so they are not removed.
    listeners_confirmed: bool,
    /// How many listeners in `sent` point at each cluster, as of
    /// `uses_base`; brought up to date by a diff before use.
    uses: HashMap<String, usize>,
    uses_base: Resources,
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
            uses: HashMap::new(),
            uses_base: Resources::new(),
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
    /// O(what differs), since what was ACKed shares nodes with the snapshot.
    pub fn lagging(&self) -> bool {
        if self.awaiting() {
            return true;
        }
        let ts = &self.types[Kind::Listener as usize];
        if !ts.subscribed {
            return true;
        }
        let want = self.snap.get(Kind::Listener);
        let answered = |n: &String, r: &Arc<Resource>| {
            ts.acked.get(n) == Some(&r.version) || ts.rejected.get(n) == Some(&r.version)
        };
        ts.acked_res.diff(want).any(|item| match item {
            DiffItem::Add(n, r) | DiffItem::Update { new: (n, r), .. } => !answered(n, r),
            DiffItem::Remove(..) => true,
        })
    }

    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        let changed = Kind::ALL
            .iter()
            .any(|k| !self.snap.get(*k).ptr_eq(snap.get(*k)));
        if changed {
            // The types depend on each other (warming, clusters in use):
            // any change may touch all three.
            self.mark(&Kind::ALL);
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
            Kind::Secret => &[Kind::Secret],
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
                let names: BTreeSet<String> = req.names.iter().cloned().collect();
                if names != ts.names {
                    // SotW repeats the whole list; what changed is the
                    // symmetric difference.
                    let moved: Vec<String> =
                        names.symmetric_difference(&ts.names).cloned().collect();
                    ts.names_changed.extend(moved);
                    ts.names = names;
                }
                let wildcard = !kind.named() && ts.names.is_empty();
                ts.full |= wildcard != ts.wildcard;
                ts.wildcard = wildcard;
            }
            Flavor::Delta => {
                let ts = self.ts(kind);
                if first {
                    ts.subscribed = true;
                    ts.full = true;
                    ts.wildcard = !kind.named() && req.subscribe.is_empty();
                    ts.must_respond = req.initial_versions.is_empty();
                    for (name, version) in &req.initial_versions {
                        ts.acked.insert(name.clone(), version.clone());
                        let held = Arc::new(Resource::placeholder(name, version));
                        ts.sent.insert(name.clone(), held);
                    }
                    ts.acked_res = ts.sent.clone();
                }
                for name in &req.subscribe {
                    if name == "*" {
                        ts.full |= !ts.wildcard;
                        ts.wildcard = true;
                    } else if ts.names.insert(name.clone()) {
                        ts.names_changed.insert(name.clone());
                    }
                }
                for name in &req.unsubscribe {
                    if name == "*" {
                        ts.full |= ts.wildcard;
                        ts.wildcard = false;
                    }
                    ts.names.remove(name);
                    ts.forget(name);
                    ts.names_changed.insert(name.clone());
                }
            }
        }
        if first && kind == Kind::Endpoint {
            // Clusters sent anew on this stream need their assignment again,
            // even if Envoy reports holding it.
            let ts = self.ts(kind);
            for name in ts.fresh_needed.clone() {
                ts.forget(&name);
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
        if let Some(error) = &req.error {
            let mut failed: Vec<String> = ts
                .sent
                .keys()
                .filter(|n| mentions(error, n))
                .cloned()
                .collect();
            if failed.is_empty() {
                // The error names nothing: take it that everything this
                // response changed was refused.
                failed = ts
                    .acked_res
                    .diff(&ts.sent)
                    .filter_map(|item| match item {
                        DiffItem::Add(n, _) => Some(n.clone()),
                        DiffItem::Update { old, new } if old.1.version != new.1.version => {
                            Some(new.0.clone())
                        }
                        _ => None,
                    })
                    .collect();
            }
            for name in &failed {
                if let Some(h) = ts.sent.remove(name) {
                    ts.rejected.insert(name.clone(), h.version.clone());
                }
                // Envoy keeps what it had before, if anything.
                if let Some(old) = ts.acked_res.get(name).cloned() {
                    ts.sent.insert(name.clone(), old);
                }
            }
        }
        ts.take_ack();
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
        let ts = self.ts(kind);
        ts.subscribed = true;
        ts.full = true;
        if req.version_info.is_empty() {
            ts.must_respond = true;
            return;
        }
        // Envoy is reconnecting. If it holds exactly what we would send,
        // take that as acknowledged; otherwise answer in full.
        let ts = self.ts(kind);
        ts.names = req.names.iter().cloned().collect();
        ts.wildcard = !kind.named() && ts.names.is_empty();
        let desired = self.desired(kind, true);
        if sotw_version(&desired) == req.version_info {
            let ts = self.ts(kind);
            ts.sent = desired;
            ts.take_ack();
            ts.names_changed.clear();
            ts.full = false;
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
        for kind in Kind::ALL {
            let busy = |k: Kind| self.types[k as usize].pending.is_some();
            let ts = &self.types[kind as usize];
            let blocked = match kind {
                Kind::Cluster | Kind::Secret => false,
                // Envoy ACKs clusters only once they are warm, which needs
                // their endpoints: EDS must not wait for that ACK.
                Kind::Endpoint => false,
                Kind::Listener => busy(Kind::Cluster) || busy(Kind::Endpoint),
            };
            if !ts.dirty || !ts.subscribed || ts.pending.is_some() || blocked {
                continue;
            }
            let desired = self.desired(kind, self.trust_listeners);
            let clusters = self.types[Kind::Cluster as usize].sent.clone();
            let ts = self.ts(kind);
            ts.dirty = false;
            if kind == Kind::Endpoint {
                ts.names_changed.clear();
                ts.full = false;
                ts.seen_clusters = clusters;
            }
            if let Some(msg) = self.respond(kind, desired) {
                out.push(msg);
                // Clusters sent decide which assignments are due; listeners
                // sent decide which clusters are still in use.
                match kind {
                    Kind::Cluster => self.mark(&[Kind::Endpoint]),
                    Kind::Listener => self.mark(&[Kind::Cluster]),
                    Kind::Endpoint | Kind::Secret => {}
                }
            }
        }
        out
    }

    fn respond(&mut self, kind: Kind, desired: Resources) -> Option<Outgoing> {
        let flavor = self.flavor;
        let ts = &self.types[kind as usize];
        let mut changed: Vec<Arc<Resource>> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for item in ts.sent.diff(&desired) {
            let new = match item {
                DiffItem::Add(_, r) => r,
                DiffItem::Update { old, new } if old.1.version != new.1.version => new.1,
                DiffItem::Update { .. } => continue,
                DiffItem::Remove(n, _) => {
                    removed.push(n.clone());
                    continue;
                }
            };
            if ts.rejected.get(&new.name) != Some(&new.version) {
                changed.push(new.clone());
            }
        }
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
        let old_sent = std::mem::replace(&mut ts.sent, desired);
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
                eds.forget(&r.name);
                eds.fresh_needed.insert(r.name.clone());
            }
        }
        let ts = &mut self.types[kind as usize];
        if kind == Kind::Endpoint {
            let sent = &ts.sent;
            ts.fresh_needed.retain(|n| !sent.contains_key(n));
        }
        let resources = match (flavor, kind) {
            // SotW drops listeners and clusters missing from a response, so
            // those go out in full. Assignments are not dropped that way:
            // only the changed ones go, as in delta.
            (Flavor::Sotw, Kind::Listener | Kind::Cluster) => ts.sent.values().cloned().collect(),
            // Secrets, like assignments, go by name: only the changed ones.
            _ => changed,
        };
        Some(Outgoing {
            kind,
            nonce,
            version,
            resources,
            removed: match flavor {
                Flavor::Sotw => Vec::new(),
                Flavor::Delta => removed,
            },
        })
    }

    /// Brings the count of listeners per cluster up to date with the
    /// listeners sent.
    fn sync_uses(&mut self) {
        let sent = &self.types[Kind::Listener as usize].sent;
        let uses = &mut self.uses;
        let mut add = |r: &Arc<Resource>, by: isize| {
            if let Some(c) = &r.cluster {
                let n = uses.entry(c.clone()).or_default();
                *n = n.saturating_add_signed(by);
                if *n == 0 {
                    uses.remove(c);
                }
            }
        };
        for item in self.uses_base.diff(sent) {
            match item {
                DiffItem::Add(_, r) => add(r, 1),
                DiffItem::Update { old, new } => {
                    add(old.1, -1);
                    add(new.1, 1);
                }
                DiffItem::Remove(_, r) => add(r, -1),
            }
        }
        self.uses_base = sent.clone();
    }

    /// What Envoy should hold of `kind` right now: the snapshot, with the
    /// few exceptions found by comparing it with what was sent (listeners
    /// waiting for their clusters, clusters kept for listeners Envoy still
    /// holds, assignments of clusters Envoy has). Costs O(what differs).
    fn desired(&mut self, kind: Kind, trust_listeners: bool) -> Resources {
        if kind == Kind::Cluster {
            self.sync_uses();
        }
        let snap = self.snap.get(kind);
        let ts = &self.types[kind as usize];
        let mut out = snap.clone();
        match kind {
            Kind::Secret => {
                // Only the secrets Envoy asked for, and every one it asked
                // for that exists.
                let mut want = Resources::new();
                for name in &ts.names {
                    if let Some(r) = snap.get(name) {
                        want.insert(name.clone(), r.clone());
                    }
                }
                out = want;
            }
            Kind::Cluster => {
                // Held from before this stream, contents unknown: keep it
                // (unchanged, so nothing is sent) until Envoy has ACKed
                // listeners that no longer need it.
                let keep_unknown = self.flavor == Flavor::Delta && !self.listeners_confirmed;
                for item in ts.sent.diff(snap) {
                    if let DiffItem::Remove(name, held) = item {
                        let keep = if is_placeholder(held) {
                            keep_unknown
                        } else {
                            self.uses.contains_key(name)
                        };
                        if keep {
                            out.insert(name.clone(), held.clone());
                        }
                    }
                }
            }
            Kind::Endpoint => {
                let clusters = &self.types[Kind::Cluster as usize].sent;
                let wanted = |n: &str| ts.wildcard || ts.names.contains(n);
                let one = |name: &str| -> Option<Arc<Resource>> {
                    if !wanted(name) {
                        return None;
                    }
                    if let Some(r) = snap.get(name) {
                        return Some(r.clone());
                    }
                    if !clusters.contains_key(name) {
                        return None;
                    }
                    // A cluster Envoy has but we have no endpoints for (its
                    // mapping went away before Envoy asked) keeps what it
                    // was sent, or gets an empty assignment, or it would warm
                    // until Envoy's 15 s timeout.
                    match ts.sent.get(name) {
                        Some(h) if !is_placeholder(h) => Some(h.clone()),
                        _ => Some(Arc::new(super::resources::no_endpoints(name))),
                    }
                };
                let mut names: BTreeSet<&str> = BTreeSet::new();
                if ts.full {
                    names.extend(snap.keys().map(String::as_str));
                    names.extend(ts.sent.keys().map(String::as_str));
                    names.extend(clusters.keys().map(String::as_str));
                    names.extend(ts.names.iter().map(String::as_str));
                } else {
                    for item in ts.sent.diff(snap) {
                        names.insert(diff_name(&item));
                    }
                    for item in ts.seen_clusters.diff(clusters) {
                        names.insert(diff_name(&item));
                    }
                    names.extend(ts.names_changed.iter().map(String::as_str));
                }
                for name in names {
                    match one(name) {
                        Some(r) => {
                            if out.get(name).is_none_or(|o| !Arc::ptr_eq(o, &r)) {
                                out.insert(name.to_string(), r);
                            }
                        }
                        None => {
                            out.remove(name);
                        }
                    }
                }
            }
            Kind::Listener => {
                for item in ts.sent.diff(snap) {
                    let (name, held, res) = match item {
                        DiffItem::Add(n, r) => (n, None, r),
                        DiffItem::Update { old, new } => (new.0, Some(old.1), new.1),
                        DiffItem::Remove(..) => continue,
                    };
                    let ready = trust_listeners
                        || held.is_some_and(|h| h.version == res.version || is_placeholder(h))
                        || res.cluster.as_ref().is_none_or(|c| self.warm(c));
                    if ready {
                        continue;
                    }
                    // Not yet: keep the older version Envoy has, if any.
                    match held {
                        Some(old) => out.insert(name.clone(), old.clone()),
                        None => out.remove(name),
                    };
                }
            }
        }
        out
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

/// A stand-in for a resource Envoy held before this stream began.
fn is_placeholder(r: &Resource) -> bool {
    r.any.type_url.is_empty()
}

fn diff_name<'a>(item: &DiffItem<'a, 'a, String, Arc<Resource>>) -> &'a str {
    match item {
        DiffItem::Add(n, _) | DiffItem::Remove(n, _) => n,
        DiffItem::Update { new, .. } => new.0,
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
