//! The registrar's state: every live mapping, who owns it, what each
//! connected Envoy has accepted, and so who should serve each port. Every
//! change publishes a new xDS snapshot and sends the proxies their orders.
//!
//! A mapping is keyed by (proto, host ip, host port). It dies when its
//! proxy deregisters, when the proxy's connection closes, or (for mappings
//! taken from /proc or replayed by resync) when the owning process exits.
//! An Envoy's NACK marks it failed and keeps it: its proxy relays on.
//!
//! Who serves a TCP port (see `proxy::handover` for the proxy's side):
//! - hand over (order `Serve(Envoy)`) once at least one Envoy is connected
//!   and every connected Envoy serves the mapping's current listener and
//!   endpoints;
//! - take back (order `Serve(Relay)`) once no connected Envoy may still
//!   hold the listener. An Envoy whose holdings are not known yet (it has
//!   just connected) may hold it; so may an Envoy that has not reconnected
//!   yet within [`RECONNECT_GRACE`] of the registrar's start (until the
//!   first Envoy connects), because a restarted registrar must not chase
//!   proxies back out while Envoy serves.

use super::docker::meta::ContainerMeta;
use super::liveness::OwnerProcess;
use super::metrics::Metrics;
use crate::mapping::{
    ContainerRef, EnvoyStatus, Mapping, MappingKey, MappingState, MappingStatus, Mode, Proto,
    Server,
};
use crate::protocol::Reply;
use crate::xds::resource::Service;
use crate::xds::resources;
use crate::xds::session::{mentions, Feedback, Versions};
use crate::xds::snapshot::{Kind, Snapshot};
use crate::xds::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How long after its start the registrar waits for Envoys to reconnect
/// before it takes ports back from Envoys it has not heard from.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// Where the registrar sends a proxy's orders: its connection's outbox.
pub type Outbox = mpsc::UnboundedSender<Reply>;

#[derive(Debug)]
struct Entry {
    mapping: Mapping,
    mode: Mode,
    name: String,
    owner: OwnerProcess,
    /// The registrar connection this mapping lives with, if any.
    conn: Option<u64>,
    state: MappingState,
    /// Who accepts its connections: as ordered, or as its proxy reported.
    server: Server,
    /// Connections its proxy has relayed in all, as last reported.
    relayed: u64,
    /// The container behind the mapping, once Docker has told us.
    container: Option<Arc<ContainerMeta>>,
    /// When it was registered, until every Envoy has ACKed it once.
    since: Option<Instant>,
}

impl Entry {
    fn listener(&self) -> String {
        self.mapping.key.resource_name()
    }

    /// Sets name and mode from the container's labels; true if they changed.
    fn describe(&mut self, default_mode: Mode) -> bool {
        let (name, mode) = match &self.container {
            Some(c) => {
                let n = c.naming();
                (n.name, n.mode.unwrap_or(default_mode))
            }
            None => (default_name(&self.mapping), default_mode),
        };
        let changed = name != self.name || mode != self.mode;
        self.name = name;
        self.mode = mode;
        changed
    }
}

/// What one connected Envoy holds, name to version.
#[derive(Debug, Default)]
struct EnvoyView {
    /// The xDS stream's number, as the log names it.
    stream: u64,
    /// Since when it has left a response unanswered past the deadline; it
    /// does not count towards hand-overs meanwhile.
    stalled: Option<Instant>,
    /// From its last LDS ACK or NACK (or its first request); `None` before.
    listeners: Option<Versions>,
    endpoints: Versions,
}

impl EnvoyView {
    /// True if this Envoy serves `listener` as the snapshot has it now: the
    /// current listener, and the current endpoints of its cluster.
    fn serves(&self, snap: &Snapshot, listener: &str) -> bool {
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
    fn may_hold(&self, listener: &str) -> bool {
        match &self.listeners {
            Some(m) => m.contains_key(listener),
            None => self.stalled.is_none(),
        }
    }

    fn holds(&self, listener: &str) -> bool {
        self.listeners
            .as_ref()
            .is_some_and(|m| m.contains_key(listener))
    }
}

#[derive(Debug)]
pub struct Registry {
    entries: BTreeMap<MappingKey, Entry>,
    default_mode: Mode,
    envoys: BTreeMap<u64, EnvoyView>,
    next_envoy: u64,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// The snapshot being edited; each change sets or removes only the
    /// resources of the mappings it touches, then a clone is sent.
    snap: Snapshot,
    /// The resources each mapping put into `snap`, to take out again.
    published: BTreeMap<MappingKey, Vec<(Kind, String)>>,
    /// Resource name (listener or cluster) to its mapping, so that an ACK
    /// of a few resources re-judges only their mappings.
    by_name: BTreeMap<String, MappingKey>,
    /// Deregistrations waiting for every Envoy to drop their listener.
    closing: Vec<(MappingKey, oneshot::Sender<()>)>,
    /// Containers Docker told us about, by id.
    containers: BTreeMap<String, Arc<ContainerMeta>>,
    /// Tracing and access logs, as Envoy gets them with every listener.
    telemetry: Telemetry,
    /// Open proxy connections, by id, for their orders.
    links: BTreeMap<u64, Outbox>,
    started: Instant,
    grace: Duration,
    /// Set once any Envoy has connected: the grace is only for the first.
    seen_envoy: bool,
    /// Where pidfd watches report owners that exited.
    exits: Option<super::liveness::Exits>,
    metrics: Arc<Metrics>,
    /// Set once start-up is over and Envoys are served.
    serving_envoys: bool,
}

pub type Shared = Arc<Mutex<Registry>>;

impl Registry {
    pub fn new(default_mode: Mode) -> Registry {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        Registry {
            entries: BTreeMap::new(),
            default_mode,
            envoys: BTreeMap::new(),
            next_envoy: 0,
            snapshots,
            snap: Snapshot::default(),
            published: BTreeMap::new(),
            by_name: BTreeMap::new(),
            closing: Vec::new(),
            containers: BTreeMap::new(),
            telemetry: Telemetry::default(),
            links: BTreeMap::new(),
            started: Instant::now(),
            grace: RECONNECT_GRACE,
            seen_envoy: false,
            exits: None,
            metrics: Arc::default(),
            serving_envoys: false,
        }
    }

    /// Start-up is over: Envoys are served from now on.
    pub fn set_serving_envoys(&mut self) {
        self.serving_envoys = true;
    }

    pub fn serving_envoys(&self) -> bool {
        self.serving_envoys
    }

    /// The counters this registry and its xDS server keep.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Watches the owners of mappings held for a pid, reporting exits on
    /// `exits` (see [`Registry::owner_exited`]).
    pub fn with_exit_watch(mut self, exits: super::liveness::Exits) -> Registry {
        self.exits = Some(exits);
        self
    }

    /// Sets how long Envoys get to reconnect after start (tests use zero).
    pub fn with_grace(mut self, grace: Duration) -> Registry {
        self.grace = grace;
        self
    }

    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Registry {
        self.telemetry = telemetry;
        self.publish_all();
        self
    }

    pub fn shared(self) -> Shared {
        Arc::new(Mutex::new(self))
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// A proxy connection opened: its orders go to `outbox`.
    pub fn link_opened(&mut self, conn: u64, outbox: Outbox) {
        self.links.insert(conn, outbox);
    }

    /// Adds a mapping or confirms an identical one. `meta` is the container
    /// found for it at registration, if any; `server` is who serves the
    /// port as the registrant says.
    pub fn register(
        &mut self,
        mapping: Mapping,
        owner: OwnerProcess,
        conn: Option<u64>,
        server: Server,
        meta: Option<ContainerMeta>,
    ) -> Result<(), String> {
        if mapping.key.proto == Proto::Sctp {
            return Err("SCTP is not supported".into());
        }
        if let Some(e) = self.entries.get(&mapping.key) {
            if e.mapping.backend != mapping.backend {
                if e.owner.pid != owner.pid && e.owner.alive() {
                    return Err(format!(
                        "{} is already registered by pid {} for {}",
                        mapping.key,
                        e.owner.pid,
                        e.mapping.backend.addr()
                    ));
                }
                // The old owner is gone and has not been reaped yet.
                self.remove(&mapping.key, "replaced by a new registration", false);
            }
        }
        let container = match meta {
            Some(m) => Some(self.remember(m)),
            None => self.container_for(&mapping),
        };
        let fresh = !self.entries.contains_key(&mapping.key);
        let default_mode = self.default_mode;
        let entry = self.entries.entry(mapping.key).or_insert_with(|| Entry {
            mapping,
            mode: default_mode,
            name: default_name(&mapping),
            owner,
            conn,
            state: MappingState::Pending,
            server,
            relayed: 0,
            container: None,
            since: Some(Instant::now()),
        });
        let mut renamed = false;
        if container.is_some() && entry.container != container {
            entry.container = container;
            renamed = entry.describe(default_mode) && !fresh;
        }
        let entry = self.entries.get_mut(&mapping.key).expect("just inserted");
        // Idempotent: the newest registrant owns the mapping from now on.
        let watch = conn.is_none() && (fresh || entry.owner != owner || entry.conn.is_some());
        entry.owner = owner;
        entry.conn = conn;
        if let (true, Some(exits)) = (watch, &self.exits) {
            super::liveness::watch(mapping.key, owner, exits);
        }
        entry.server = server;
        // With no Envoy to wait for, a relaying (or starting) proxy hears
        // at once that it is to go on relaying.
        if server == Server::Relay && self.envoys.is_empty() {
            if let Some(tx) = conn.and_then(|c| self.links.get(&c)) {
                let _ = tx.send(Reply::Serve(Server::Relay));
            }
        }
        if fresh {
            self.metrics.registered();
            tracing::info!("registered {mapping} (pid {})", owner.pid);
        }
        if fresh || renamed {
            self.refresh(&mapping.key);
            self.send();
        }
        self.evaluate_keys([mapping.key]);
        Ok(())
    }

    /// A proxy's report of who serves its mapping now.
    pub fn serving(&mut self, conn: u64, key: &MappingKey, server: Server, relayed: u64) {
        let Some(e) = self.entries.get_mut(key).filter(|e| e.conn == Some(conn)) else {
            return;
        };
        self.metrics.relayed(relayed.saturating_sub(e.relayed));
        e.relayed = relayed;
        if server == Server::Envoy && e.server != Server::Envoy {
            self.metrics.handed_over();
            tracing::info!("{} handed over to Envoy", e.mapping);
        }
        e.server = server;
        self.evaluate_keys([*key]);
    }

    /// Removes a mapping. The receiver resolves once no connected Envoy
    /// holds its listener any more, so the port is closed.
    pub fn deregister(&mut self, key: &MappingKey) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.closing.push((*key, tx));
        if self.remove(key, "deregistered", true) {
            self.send();
        }
        self.evaluate_keys([]);
        rx
    }

    /// A registrar connection closed: its mappings go with it.
    pub fn connection_closed(&mut self, conn: u64) {
        self.links.remove(&conn);
        let gone: Vec<MappingKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.conn == Some(conn))
            .map(|(k, _)| *k)
            .collect();
        self.remove_all(&gone, "its proxy went away", true);
    }

    /// Drops mappings held for a pid (recovered or replayed, so without a
    /// connection) whose process has exited. A proxy whose connection is
    /// open is alive, whatever /proc says.
    pub fn reap(&mut self) {
        let gone: Vec<MappingKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.conn.is_none() && !e.owner.alive())
            .map(|(k, _)| *k)
            .collect();
        self.remove_all(&gone, "its proxy exited", true);
    }

    /// A watched owner process exited (its pidfd became readable).
    pub fn owner_exited(&mut self, key: &MappingKey, owner: OwnerProcess) {
        let gone = self
            .entries
            .get(key)
            .is_some_and(|e| e.conn.is_none() && e.owner == owner);
        if gone {
            self.remove_all(&[*key], "its proxy exited", true);
        }
    }

    fn remove_all(&mut self, keys: &[MappingKey], why: &str, by_owner: bool) {
        let mut changed = false;
        for k in keys {
            changed |= self.remove(k, why, by_owner);
        }
        if changed {
            self.send();
            self.evaluate_keys([]);
        }
    }

    /// Drops a mapping. Unless its own proxy asked (`by_owner`), the
    /// proxy's connection is closed, so that it registers again.
    fn remove(&mut self, key: &MappingKey, why: &str, by_owner: bool) -> bool {
        let Some(e) = self.entries.remove(key) else {
            return false;
        };
        self.metrics.deregistered();
        tracing::info!("removed {} ({why})", e.mapping);
        self.refresh(key);
        if let (false, Some(c)) = (by_owner, e.conn) {
            self.links.remove(&c);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn list(&self) -> Vec<MappingStatus> {
        self.entries
            .values()
            .map(|e| MappingStatus {
                mapping: e.mapping,
                mode: e.mode,
                name: e.name.clone(),
                state: e.state.clone(),
                server: e.server,
                owner_pid: e.owner.pid,
                container: e.container.as_ref().map(|c| ContainerRef {
                    id: c.id.clone(),
                    name: c.name.clone(),
                }),
            })
            .collect()
    }

    fn remember(&mut self, meta: ContainerMeta) -> Arc<ContainerMeta> {
        if let Some(bad) = meta.bad_mode() {
            tracing::warn!(
                "container {}: label ProxyMode={bad:?} is neither http nor tcp; using {}",
                meta.name,
                self.default_mode.as_str()
            );
        }
        // A reused address belongs to the new container now.
        self.containers
            .retain(|id, c| id == &meta.id || !c.ips.iter().any(|ip| meta.ips.contains(ip)));
        let meta = Arc::new(meta);
        self.containers.insert(meta.id.clone(), meta.clone());
        meta
    }

    fn container_for(&self, m: &Mapping) -> Option<Arc<ContainerMeta>> {
        self.containers
            .values()
            .find(|c| {
                c.serves(
                    m.backend.container_ip,
                    m.backend.container_port,
                    m.key.proto,
                )
            })
            .cloned()
    }

    /// Docker told us about a container (after its start, or a rename):
    /// name its mappings after it and apply its mode.
    pub fn apply_container(&mut self, meta: ContainerMeta) {
        let meta = self.remember(meta);
        let default_mode = self.default_mode;
        let mut changed = Vec::new();
        for e in self.entries.values_mut() {
            let b = e.mapping.backend;
            if !meta.serves(b.container_ip, b.container_port, e.mapping.key.proto) {
                continue;
            }
            e.container = Some(meta.clone());
            if e.describe(default_mode) {
                tracing::info!("{} is now {} ({})", e.mapping, e.name, e.mode.as_str());
                changed.push(e.mapping.key);
            }
        }
        if !changed.is_empty() {
            for key in &changed {
                self.refresh(key);
            }
            self.send();
        }
    }

    /// The container is gone: its address may be reused by the next one.
    pub fn forget_container(&mut self, id: &str) {
        self.containers.remove(id);
    }

    /// An xDS stream named the right node in its first request: from now
    /// on it counts as an Envoy.
    pub fn envoy_connected(&mut self, stream: u64) -> u64 {
        self.next_envoy += 1;
        let view = EnvoyView {
            stream,
            ..Default::default()
        };
        self.envoys.insert(self.next_envoy, view);
        self.seen_envoy = true;
        self.evaluate();
        self.next_envoy
    }

    pub fn envoy_gone(&mut self, id: u64) {
        self.envoys.remove(&id);
        self.evaluate();
    }

    pub fn envoy_count(&self) -> usize {
        self.envoys.len()
    }

    /// An Envoy stopped answering (`true`) or answers again.
    pub fn envoy_stalled(&mut self, id: u64, stalled: bool) {
        if let Some(v) = self.envoys.get_mut(&id) {
            v.stalled = stalled.then(Instant::now);
        }
        self.evaluate();
    }

    /// The Envoy streams, for `status` and `/healthz`.
    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        self.envoys
            .values()
            .map(|v| EnvoyStatus {
                stream: v.stream,
                stalled_secs: v.stalled.map(|t| t.elapsed().as_secs()),
            })
            .collect()
    }

    /// An ACK or NACK from one Envoy, or what its first request said it holds.
    pub fn envoy_feedback(&mut self, id: u64, fb: Feedback) {
        let Some(view) = self.envoys.get_mut(&id) else {
            return;
        };
        match fb.kind {
            Kind::Listener => view.listeners = Some(fb.held),
            Kind::Endpoint => view.endpoints = fb.held,
            Kind::Cluster => return,
        }
        // Only the mappings whose resources this answer was about.
        let touched: Vec<MappingKey> = match &fb.touched {
            Some(names) => names
                .iter()
                .filter_map(|n| self.by_name.get(n).copied())
                .collect(),
            None => self.entries.keys().copied().collect(),
        };
        let Some(error) = fb.error.filter(|_| fb.kind == Kind::Listener) else {
            self.evaluate_keys(touched);
            return;
        };
        let rejected: Vec<MappingKey> = self
            .entries
            .values()
            .filter(|e| mentions(&error, &e.listener()))
            .map(|e| e.mapping.key)
            .collect();
        // The proxy owns the port and relays while Envoy cannot serve it, so
        // the mapping is kept, marked failed, until Envoy accepts it.
        for key in &rejected {
            if let Some(e) = self.entries.get_mut(key) {
                tracing::warn!("Envoy rejected the listener of {key}; its proxy relays: {error}");
                e.state = MappingState::Failed(error.clone());
            }
        }
        self.evaluate_keys(touched.into_iter().chain(rejected));
    }

    /// Recomputes every TCP mapping's state from what the Envoys hold, and
    /// orders proxies to hand over or take back where that changed. For
    /// what touches every mapping: an Envoy coming, going or stalling.
    fn evaluate(&mut self) {
        let keys: Vec<MappingKey> = self.entries.keys().copied().collect();
        self.evaluate_keys(keys);
    }

    /// The same for the given mappings only (and the pending closes): a
    /// change to one mapping, or an ACK of a few resources, costs what it
    /// touches, not the whole table.
    fn evaluate_keys(&mut self, keys: impl IntoIterator<Item = MappingKey>) {
        let held =
            |envoys: &BTreeMap<u64, EnvoyView>, name: &str| envoys.values().any(|v| v.holds(name));
        if !self.closing.is_empty() {
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.closing)
                .into_iter()
                .partition(|(key, _)| {
                    self.entries.contains_key(key) || !held(&self.envoys, &key.resource_name())
                });
            self.closing = waiting;
            for (_, tx) in done {
                let _ = tx.send(());
            }
        }
        let waiting_for_envoys =
            !self.seen_envoy && self.envoys.is_empty() && self.started.elapsed() < self.grace;
        for key in keys {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            let world = World {
                envoys: &self.envoys,
                links: &self.links,
                snap: &self.snap,
                metrics: &self.metrics,
                waiting_for_envoys,
            };
            judge(e, &world);
        }
    }

    /// Re-evaluates after time alone changed the picture (the reconnect
    /// grace running out).
    pub fn tick(&mut self) {
        self.evaluate();
    }

    /// Puts the mapping's resources into the snapshot being edited as the
    /// entry is now (or takes them out if it is gone): O(log n).
    fn refresh(&mut self, key: &MappingKey) {
        for (kind, name) in self.published.remove(key).unwrap_or_default() {
            self.snap.remove(kind, &name);
            self.by_name.remove(&name);
        }
        let Some(e) = self.entries.get(key) else {
            return;
        };
        if e.mapping.key.proto != Proto::Tcp {
            return;
        }
        let svc = service(e);
        let mut names = Vec::with_capacity(3);
        for (kind, res) in [
            (Kind::Cluster, resources::cluster(&svc)),
            (Kind::Endpoint, resources::endpoints(&svc)),
            (Kind::Listener, resources::listener(&svc, &self.telemetry)),
        ] {
            names.push((kind, res.name.clone()));
            self.by_name.insert(res.name.clone(), *key);
            self.snap.set(kind, Arc::new(res));
        }
        self.published.insert(*key, names);
    }

    /// Sends the edited snapshot to every Envoy stream: a clone in O(1).
    fn send(&self) {
        self.snapshots.send_replace(Arc::new(self.snap.clone()));
    }

    /// Rebuilds every resource (the telemetry changed) and sends.
    fn publish_all(&mut self) {
        self.snap = Snapshot::build(std::iter::empty(), &self.telemetry);
        self.published.clear();
        self.by_name.clear();
        let keys: Vec<MappingKey> = self.entries.keys().copied().collect();
        for key in &keys {
            self.refresh(key);
        }
        self.send();
    }
}

/// What a mapping is judged against.
struct World<'a> {
    envoys: &'a BTreeMap<u64, EnvoyView>,
    links: &'a BTreeMap<u64, Outbox>,
    snap: &'a Snapshot,
    metrics: &'a Metrics,
    /// Still in the reconnect grace, with no Envoy seen yet.
    waiting_for_envoys: bool,
}

/// Settles one mapping: its state from what the Envoys hold, and an order
/// to its proxy if who should serve it changed.
fn judge(e: &mut Entry, w: &World) {
    let World {
        envoys,
        links,
        snap,
        metrics,
        waiting_for_envoys,
    } = *w;
    if e.mapping.key.proto != Proto::Tcp {
        e.state = MappingState::Active;
        return;
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
    let order = match e.server {
        Server::Relay if served => Server::Envoy,
        Server::Handover | Server::Envoy if !may_hold => Server::Relay,
        _ => return,
    };
    // Nobody to tell (a mapping recovered or replayed for a pid): what the
    // proxy does is unknown until it registers again.
    let Some(outbox) = e.conn.and_then(|c| links.get(&c)) else {
        return;
    };
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
    let _ = outbox.send(Reply::Serve(order));
}

/// What the xDS layer needs to know of one mapping.
fn service(e: &Entry) -> Service {
    let (service, environment) = match &e.container {
        Some(c) => {
            let n = c.naming();
            (n.service, n.environment)
        }
        None => (e.name.clone(), None),
    };
    Service {
        key: e.mapping.key,
        backend: e.mapping.backend,
        mode: e.mode,
        name: e.name.clone(),
        service,
        environment,
        container: e.container.as_ref().map(|c| c.name.clone()),
        image: e.container.as_ref().map(|c| c.image.clone()),
    }
}

/// The name a mapping has until Docker tells us better: the container's
/// address, which is unique and stable for the container's life.
fn default_name(m: &Mapping) -> String {
    crate::mapping::sanitize(&format!(
        "{}-{}",
        m.backend.container_ip, m.backend.container_port
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Backend;

    fn mapping(port: u16, backend: &str) -> Mapping {
        Mapping {
            key: MappingKey {
                proto: Proto::Tcp,
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: port,
            },
            backend: Backend {
                container_ip: backend.parse().unwrap(),
                container_port: 80,
            },
        }
    }

    fn me() -> OwnerProcess {
        OwnerProcess::of(std::process::id())
    }

    /// An ACK from `envoy` of everything of `kind` in the current snapshot.
    /// The ACK names what it answered, as the session reports it, so the
    /// registry re-judges just those mappings.
    fn ack(r: &mut Registry, envoy: u64, kind: Kind) {
        let held: Versions = r
            .snapshots()
            .borrow()
            .get(kind)
            .iter()
            .map(|(n, res)| (n.clone(), res.version.clone()))
            .collect();
        let touched = Some(held.keys().cloned().collect());
        r.envoy_feedback(
            envoy,
            Feedback {
                kind,
                held,
                error: None,
                touched,
            },
        );
    }

    #[test]
    fn an_ack_naming_one_mapping_settles_that_one_only() {
        let (mut r, mut rx) = with_link(1);
        let envoy = r.envoy_connected(1);
        let (a, b) = (mapping(86, "10.0.0.2"), mapping(87, "10.0.0.3"));
        r.register(a, me(), Some(1), Server::Relay, None).unwrap();
        r.register(b, me(), Some(1), Server::Relay, None).unwrap();
        let snap = r.snapshots().borrow().clone();
        let versions = |kind: Kind| -> Versions {
            snap.get(kind)
                .iter()
                .map(|(n, res)| (n.clone(), res.version.clone()))
                .collect()
        };
        let cluster_of_a = snap.get(Kind::Listener)[&a.key.resource_name()]
            .cluster
            .clone()
            .unwrap();
        // Envoy holds everything, but the answers name only a's resources.
        for (kind, name) in [
            (Kind::Endpoint, cluster_of_a),
            (Kind::Listener, a.key.resource_name()),
        ] {
            r.envoy_feedback(
                envoy,
                Feedback {
                    kind,
                    held: versions(kind),
                    error: None,
                    touched: Some(vec![name]),
                },
            );
        }
        assert_eq!(orders(&mut rx), [Server::Envoy]);
        assert_eq!(server_of(&r, 86), Server::Handover);
        assert_eq!(server_of(&r, 87), Server::Relay);
    }

    /// A registry without the reconnect grace, and one proxy connection.
    fn with_link(conn: u64) -> (Registry, mpsc::UnboundedReceiver<Reply>) {
        let mut r = Registry::new(Mode::Http).with_grace(Duration::ZERO);
        let (tx, rx) = mpsc::unbounded_channel();
        r.link_opened(conn, tx);
        (r, rx)
    }

    fn orders(rx: &mut mpsc::UnboundedReceiver<Reply>) -> Vec<Server> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            match r {
                Reply::Serve(s) => out.push(s),
                other => panic!("not an order: {other:?}"),
            }
        }
        out
    }

    fn server_of(r: &Registry, port: u16) -> Server {
        r.list()
            .iter()
            .find(|s| s.mapping.key.host_port == port)
            .unwrap()
            .server
    }

    #[test]
    fn same_backend_is_a_no_op_and_another_is_a_conflict() {
        let mut r = Registry::new(Mode::Http);
        let rx = r.snapshots();
        r.register(mapping(80, "10.0.0.2"), me(), Some(1), Server::Relay, None)
            .unwrap();
        let v1 = rx.borrow().get(Kind::Listener).len();
        r.register(mapping(80, "10.0.0.2"), me(), Some(2), Server::Relay, None)
            .unwrap();
        assert_eq!(r.list().len(), 1);
        assert_eq!(v1, 1);
        let other = OwnerProcess::of(1);
        let err = r
            .register(mapping(80, "10.0.0.3"), other, None, Server::Relay, None)
            .unwrap_err();
        assert!(err.contains("already registered"), "{err}");
        // The connection that registered last owns it now.
        r.connection_closed(1);
        assert_eq!(r.list().len(), 1);
        r.connection_closed(2);
        assert!(r.list().is_empty());
    }

    #[test]
    fn with_no_envoy_a_starting_proxy_is_told_to_relay_at_once() {
        let (mut r, mut rx) = with_link(1);
        r.register(mapping(80, "10.0.0.2"), me(), Some(1), Server::Relay, None)
            .unwrap();
        assert_eq!(orders(&mut rx), [Server::Relay]);
        assert_eq!(server_of(&r, 80), Server::Relay);
    }

    #[test]
    fn hand_over_needs_listener_and_endpoints_then_take_back_when_envoy_goes() {
        let (mut r, mut rx) = with_link(1);
        let envoy = r.envoy_connected(1);
        r.register(mapping(81, "10.0.0.2"), me(), Some(1), Server::Relay, None)
            .unwrap();
        assert_eq!(orders(&mut rx), []);
        // The listener alone is not enough: its endpoints must be there too.
        ack(&mut r, envoy, Kind::Listener);
        assert_eq!(orders(&mut rx), []);
        ack(&mut r, envoy, Kind::Endpoint);
        assert_eq!(orders(&mut rx), [Server::Envoy]);
        assert_eq!(server_of(&r, 81), Server::Handover);
        r.serving(1, &mapping(81, "10.0.0.2").key, Server::Envoy, 0);
        assert_eq!(server_of(&r, 81), Server::Envoy);
        assert_eq!(r.list()[0].state, MappingState::Active);
        // The Envoy's stream ends: nobody holds the port, take it back.
        r.envoy_gone(envoy);
        assert_eq!(orders(&mut rx), [Server::Relay]);
        assert_eq!(server_of(&r, 81), Server::Relay);
        // A new Envoy that holds nothing yet keeps the proxy relaying; its
        // ACKs hand the port over again.
        let again = r.envoy_connected(2);
        assert_eq!(orders(&mut rx), []);
        ack(&mut r, again, Kind::Listener);
        ack(&mut r, again, Kind::Endpoint);
        assert_eq!(orders(&mut rx), [Server::Envoy]);
    }

    #[test]
    fn every_envoy_must_serve_before_hand_over_and_one_left_is_enough_to_stay() {
        let (mut r, mut rx) = with_link(1);
        let a = r.envoy_connected(1);
        let b = r.envoy_connected(2);
        r.register(mapping(82, "10.0.0.2"), me(), Some(1), Server::Relay, None)
            .unwrap();
        ack(&mut r, a, Kind::Listener);
        ack(&mut r, a, Kind::Endpoint);
        assert_eq!(orders(&mut rx), [], "b has not ACKed yet");
        ack(&mut r, b, Kind::Listener);
        ack(&mut r, b, Kind::Endpoint);
        assert_eq!(orders(&mut rx), [Server::Envoy]);
        r.envoy_gone(a);
        assert_eq!(orders(&mut rx), [], "b still listens on the port");
        r.envoy_gone(b);
        assert_eq!(orders(&mut rx), [Server::Relay]);
    }

    #[test]
    fn a_stalled_envoy_counts_neither_for_nor_against_a_hand_over() {
        let (mut r, mut rx) = with_link(1);
        let real = r.envoy_connected(1);
        let rogue = r.envoy_connected(2);
        r.register(mapping(85, "10.0.0.2"), me(), Some(1), Server::Relay, None)
            .unwrap();
        ack(&mut r, real, Kind::Listener);
        ack(&mut r, real, Kind::Endpoint);
        assert_eq!(orders(&mut rx), [], "the rogue has not ACKed");
        r.envoy_stalled(rogue, true);
        assert_eq!(orders(&mut rx), [Server::Envoy]);
        assert_eq!(
            r.envoys()
                .iter()
                .filter(|e| e.stalled_secs.is_some())
                .count(),
            1
        );
        // The real one goes: a stalled peer that never said what it holds
        // does not keep the proxy from taking its port back.
        r.envoy_gone(real);
        assert_eq!(orders(&mut rx), [Server::Relay]);
    }

    #[test]
    fn a_restarted_registrar_leaves_handed_over_proxies_alone_during_the_grace() {
        let mut r = Registry::new(Mode::Http).with_grace(Duration::from_secs(3600));
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.link_opened(1, tx);
        // The proxy registers again, saying Envoy serves its port.
        r.register(mapping(83, "10.0.0.2"), me(), Some(1), Server::Envoy, None)
            .unwrap();
        assert_eq!(orders(&mut rx), []);
        // An Envoy reconnects; until it says what it holds, it may hold it.
        let envoy = r.envoy_connected(1);
        assert_eq!(orders(&mut rx), []);
        // It reports holding the listener (delta's initial versions).
        ack(&mut r, envoy, Kind::Listener);
        assert_eq!(orders(&mut rx), []);
        assert_eq!(server_of(&r, 83), Server::Envoy);
    }

    #[test]
    fn after_the_grace_a_proxy_with_no_envoy_takes_its_port_back() {
        let mut r = Registry::new(Mode::Http).with_grace(Duration::ZERO);
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.link_opened(1, tx);
        r.register(mapping(84, "10.0.0.2"), me(), Some(1), Server::Envoy, None)
            .unwrap();
        assert_eq!(orders(&mut rx), [Server::Relay]);
    }

    #[test]
    fn a_nack_marks_the_mapping_failed_and_keeps_it_relayed() {
        let (mut r, mut rx) = with_link(1);
        let envoy = r.envoy_connected(1);
        let m = mapping(80, "10.0.0.2");
        r.register(m, me(), Some(1), Server::Relay, None).unwrap();
        let error = format!(
            "Error adding/updating listener(s) {}: cannot bind '0.0.0.0:80': Address already in use",
            m.key.resource_name()
        );
        r.envoy_feedback(
            envoy,
            Feedback {
                kind: Kind::Listener,
                held: Versions::new(),
                error: Some(error.clone()),
                touched: None,
            },
        );
        let rows = r.list();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, MappingState::Failed(error));
        assert_eq!(rows[0].server, Server::Relay);
        assert_eq!(orders(&mut rx), []);
    }

    #[test]
    fn container_labels_name_mappings_and_set_their_mode() {
        let mut r = Registry::new(Mode::Http);
        let rx = r.snapshots();
        let m = mapping(8080, "172.17.0.2");
        r.register(m, me(), Some(1), Server::Relay, None).unwrap();
        assert_eq!(r.list()[0].name, "172-17-0-2-80");
        let meta = ContainerMeta {
            id: "c1".into(),
            name: "web1".into(),
            image: "busybox".into(),
            labels: [
                ("ServiceName".to_string(), "web".to_string()),
                ("EnvironmentName".to_string(), "prod".to_string()),
                ("ProxyMode".to_string(), "tcp".to_string()),
            ]
            .into(),
            ips: vec!["172.17.0.2".parse().unwrap()],
            ports: vec![(80, Proto::Tcp)],
        };
        r.apply_container(meta.clone());
        let s = &r.list()[0];
        assert_eq!((s.name.as_str(), s.mode), ("web-prod", Mode::Tcp));
        assert_eq!(s.container.as_ref().unwrap().name, "web1");
        assert!(rx
            .borrow()
            .get(Kind::Cluster)
            .contains_key("web-prod_tcp_0-0-0-0_8080"));
        // A second mapping of the same container is named at once.
        r.register(
            mapping(8081, "172.17.0.2"),
            me(),
            Some(1),
            Server::Relay,
            None,
        )
        .unwrap();
        assert!(r.list().iter().all(|s| s.name == "web-prod"));
        // Another container reusing the address takes over.
        let mut next = meta;
        next.id = "c2".into();
        next.name = "other".into();
        next.labels.clear();
        r.apply_container(next);
        assert!(r
            .list()
            .iter()
            .all(|s| s.name == "other" && s.mode == Mode::Http));
    }

    #[test]
    fn dead_owners_are_reaped_and_sctp_is_refused() {
        let mut r = Registry::new(Mode::Http);
        let dead = OwnerProcess {
            pid: u32::MAX - 1,
            start: None,
        };
        r.register(mapping(80, "10.0.0.2"), dead, None, Server::Relay, None)
            .unwrap();
        r.register(mapping(81, "10.0.0.2"), me(), None, Server::Relay, None)
            .unwrap();
        r.reap();
        assert_eq!(r.list().len(), 1);
        let mut m = mapping(82, "10.0.0.2");
        m.key.proto = Proto::Sctp;
        assert!(r.register(m, me(), None, Server::Relay, None).is_err());
    }
}
