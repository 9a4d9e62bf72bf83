//! The registrar's state: every live mapping, who owns it, what each
//! connected Envoy has accepted, and so who should serve each port. Every
//! change publishes a new xDS snapshot; the orders for the proxies, the
//! connections to close and the owners to watch are left in [`Outputs`]
//! for the owning task (`registrar::keeper`) to carry out. The registry
//! does no I/O of its own, so its decisions are tested by feeding it
//! inputs and reading what it asks for.
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
//! - a starting proxy is told to relay at once (`Serve(Relay)`) when no
//!   Envoy is connected, or when it is part of a burst of registrations or
//!   a container's later port (`burst`), so that dockerd need not wait on
//!   Envoy once per port;
//! - take back (order `Serve(Relay)`) once no connected Envoy may still
//!   hold the listener. An Envoy whose holdings are not known yet (it has
//!   just connected) may hold it; so may an Envoy that has not reconnected
//!   yet within [`RECONNECT_GRACE`] of the registrar's start (until the
//!   first Envoy connects), because a restarted registrar must not chase
//!   proxies back out while Envoy serves.
//!
//! The registry ties together, each in its own module:
//! - `burst`: whether a registration relays at once (a burst, or a
//!   container's later port);
//! - `entry`: one row of the mapping table;
//! - `envoys`: what each Envoy holds, and the judgement per mapping;
//! - `containers`: the container cache that names mappings;
//! - `publish`: the snapshot being edited, and sending it;
//! - `fleet`: this host's catalog instances, the catalog, and egress;
//! - `journal`: the last events, for the dashboard;
//! - owner liveness is `registrar::liveness` (pidfds).

mod burst;
mod containers;
mod entry;
mod envoys;
pub mod fleet;
pub mod journal;
pub mod mesh;
mod publish;
#[cfg(test)]
mod tests;

use super::docker::meta::ContainerMeta;
use super::liveness::OwnerProcess;
use super::metrics::Metrics;
use crate::mapping::{
    EnvoyStatus, Mapping, MappingKey, MappingState, MappingStatus, Mode, Proto, Server,
};
use crate::nft::{ruleset::Claims, PortsState};
use crate::protocol::Reply;
use crate::xds::serving::Serving;
use crate::xds::session::{mentions, Feedback};
use crate::xds::snapshot::{Kind, Snapshot};
use crate::xds::telemetry::Telemetry;
use containers::Containers;
use entry::Entry;
pub use entry::{DashRow, Detail};
use envoys::{judge, EnvoyView, World};
use journal::{Event, Ring};
use publish::Publisher;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// How long after its start the registrar waits for Envoys to reconnect
/// before it takes ports back from Envoys it has not heard from.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// What the registry asks of its owner after a change: the registry
/// itself does no I/O and holds no channel to a proxy, so that what it
/// decides can be tested by feeding it inputs and reading these.
#[derive(Debug, Default, PartialEq)]
pub struct Outputs {
    /// Orders to the proxies, by connection.
    pub orders: Vec<(u64, Reply)>,
    /// Connections to close, so that their proxies register again.
    pub close: Vec<u64>,
    /// Owner processes to watch: their exit ends the mapping (see
    /// [`Registry::owner_exited`]).
    pub watch: Vec<(MappingKey, OwnerProcess)>,
}

/// Why a registration was turned down; the proxy gets the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("SCTP is not supported")]
    Sctp,
    #[error("{key} is already registered by pid {pid} for {backend}")]
    Taken {
        key: MappingKey,
        pid: u32,
        backend: std::net::SocketAddr,
    },
    #[error("the registrar is shutting down")]
    Stopping,
}

/// A mapping as it comes to be registered.
#[derive(Debug)]
pub struct Arrival {
    pub mapping: Mapping,
    /// The process that owns it.
    pub owner: OwnerProcess,
    /// The proxy connection it lives with, if any.
    pub conn: Option<u64>,
    /// Who serves the port, as the registrant says.
    pub server: Server,
    /// The container found for it at registration, if any.
    pub meta: Option<ContainerMeta>,
}

#[derive(Debug)]
pub struct Registry {
    entries: BTreeMap<MappingKey, Entry>,
    default_mode: Mode,
    /// The Envoys, by the number of their xDS stream.
    envoys: BTreeMap<u64, EnvoyView>,
    publisher: Publisher,
    /// Deregistrations waiting for every Envoy to drop their listener.
    closing: Vec<(MappingKey, oneshot::Sender<()>)>,
    containers: Containers,
    /// Open proxy connections, by id: those that can take orders.
    links: BTreeSet<u64>,
    started: Instant,
    grace: Duration,
    /// Set once any Envoy has connected: the grace is only for the first.
    seen_envoy: bool,
    /// What the owner is to carry out, since the last `take_outputs`.
    out: Outputs,
    metrics: Arc<Metrics>,
    /// Set once start-up is over and Envoys are served.
    serving_envoys: bool,
    /// This host's part in the fleet, with `serve --catalog`.
    fleet: Option<fleet::LocalFleet>,
    /// This host's part in the mesh, with `serve --mesh` (which needs the
    /// fleet).
    mesh: Option<mesh::LocalMesh>,
    /// The mappings whose ports the nftables table claims (see
    /// `registrar::claims`, which follows this channel).
    claims: watch::Sender<Claims>,
    /// How published ports are reached, as that task reports it.
    ports: watch::Receiver<PortsState>,
    /// What the table holds, as that task last wrote it; `None` while
    /// ports are not claimed (no nft, or `--nft none`).
    applied: Option<Claims>,
    /// The last events, for the dashboard.
    journal: Ring,
    /// Whether Docker's API answers, as the watcher last said.
    docker: DockerReach,
    /// Whether TCP registrations come in a burst (see `burst`).
    burst: burst::Burst,
}

/// Whether Docker's API answers, as the watcher last said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DockerReach {
    /// Not heard yet, or `--docker none`.
    #[default]
    Unknown,
    /// Following its events.
    Following,
    /// It does not answer, and why.
    Unreachable(String),
}

impl Registry {
    pub fn new(default_mode: Mode) -> Registry {
        Registry {
            entries: BTreeMap::new(),
            default_mode,
            envoys: BTreeMap::new(),
            publisher: Publisher::new(),
            closing: Vec::new(),
            containers: Containers::default(),
            links: BTreeSet::new(),
            started: Instant::now(),
            grace: RECONNECT_GRACE,
            seen_envoy: false,
            out: Outputs::default(),
            metrics: Arc::default(),
            serving_envoys: false,
            fleet: None,
            mesh: None,
            claims: watch::channel(Claims::new()).0,
            ports: watch::channel(PortsState::Starting).1,
            applied: None,
            journal: Ring::new(journal::KEPT),
            docker: DockerReach::Unknown,
            burst: burst::Burst::default(),
        }
    }

    /// The table now claims `applied` (`None`: ports are not claimed):
    /// ports waiting for their claim may be handed over.
    pub fn claims_applied(&mut self, applied: Option<Claims>) {
        let keys: Vec<MappingKey> = match (&self.applied, &applied) {
            (Some(old), Some(new)) => new.difference(old).copied().collect(),
            _ => self.entries.keys().copied().collect(),
        };
        self.applied = applied;
        self.evaluate_keys(keys);
    }

    /// The claimed mappings as they change, for `registrar::claims`.
    pub fn claims(&self) -> watch::Receiver<Claims> {
        self.claims.subscribe()
    }

    /// Where `status` and `/healthz` learn how published ports are reached.
    pub fn with_ports_state(mut self, ports: watch::Receiver<PortsState>) -> Registry {
        self.ports = ports;
        self
    }

    pub fn ports_state(&self) -> PortsState {
        self.ports.borrow().clone()
    }

    /// Takes part in the fleet as `host_id`, reachable at `advertise`.
    pub fn with_fleet(mut self, host_id: String, advertise: std::net::IpAddr) -> Registry {
        let mut f = fleet::LocalFleet::new(host_id, advertise);
        for (key, e) in &self.entries {
            f.refresh(key, Some(e));
        }
        self.fleet = Some(f);
        self
    }

    /// Takes part in the mesh (after `with_fleet`): instances carry the
    /// mesh port, Envoy gets the trust bundle now and leaves as they come.
    pub fn with_mesh(
        mut self,
        m: crate::xds::mesh::Mesh,
        host_id: String,
        root_pem: &str,
    ) -> Registry {
        if let Some(f) = &mut self.fleet {
            f.mesh_port = Some(m.listen.port());
        }
        self.publisher.set_secret(
            &m.trust,
            Some(crate::xds::mesh::trust_secret(&m.trust_domain, root_pem)),
        );
        self.metrics.mesh_domain(m.trust_domain.as_str());
        self.mesh = Some(mesh::LocalMesh::new(m, host_id));
        self.send();
        self
    }

    /// The identities that need leaves, as they change.
    pub fn mesh_wanted(&self) -> Option<watch::Receiver<std::collections::BTreeSet<String>>> {
        self.mesh.as_ref().map(|m| m.subscribe())
    }

    /// A leaf was issued (or renewed) for its identity.
    pub fn mesh_leaf(&mut self, leaf: crate::mesh::ca::Leaf) {
        let Some(m) = &mut self.mesh else { return };
        let st = m.leaves.entry(leaf.id.clone()).or_insert(mesh::LeafState {
            not_after: leaf.not_after,
            issued: 0,
        });
        st.not_after = leaf.not_after;
        st.issued += 1;
        self.publisher.set_secret(
            &leaf.id,
            Some(crate::xds::mesh::identity_secret(
                &leaf.id,
                &leaf.chain_pem,
                &leaf.key_pem,
            )),
        );
        self.publisher.send();
    }

    /// An identity no longer needed: its leaf leaves Envoy.
    pub fn mesh_leaf_gone(&mut self, id: &str) {
        if let Some(m) = &mut self.mesh {
            m.leaves.remove(id);
            self.publisher.set_secret(id, None);
            self.publisher.send();
        }
    }

    /// Each identity's leaf: when it expires and how often it was issued.
    pub fn mesh_view(&self) -> Vec<(String, mesh::LeafState)> {
        self.mesh
            .iter()
            .flat_map(|m| m.leaves.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect()
    }

    /// This host's instances as they change, for publishing to etcd.
    pub fn fleet_instances(&self) -> Option<watch::Receiver<fleet::Instances>> {
        self.fleet.as_ref().map(|f| f.subscribe())
    }

    /// The catalog as just read from etcd: egress follows it.
    pub fn set_catalog(&mut self, catalog: fleet::Instances) {
        if let Some(f) = &mut self.fleet {
            let (added, gone) = catalog_diff(&f.catalog, &catalog);
            if added + gone > 0 {
                self.journal.push(Event::new(
                    journal::Kind::Etcd,
                    None,
                    format!(
                        "catalog: {} instance(s), {added} new, {gone} gone",
                        catalog.len()
                    ),
                ));
            }
            f.set_catalog(catalog);
            self.send();
        }
    }

    /// Where egress listeners listen (`None`: no egress).
    pub fn set_egress_ip(&mut self, ip: Option<std::net::IpAddr>) {
        let Some(f) = &mut self.fleet else { return };
        if f.egress_ip == ip {
            return;
        }
        for (port, _) in f.all_egress() {
            self.publisher
                .set_egress(port, std::net::Ipv4Addr::UNSPECIFIED.into(), None);
        }
        f.egress_ip = ip;
        f.reset_egress();
        self.send();
    }

    /// How the last etcd call went: `None` if it answered, else why not.
    pub fn etcd_report(&mut self, report: fleet::EtcdReport) {
        let Some(state) = self.fleet.as_mut().map(|f| &mut f.etcd) else {
            return;
        };
        match report {
            fleet::EtcdReport::Answers { member } => {
                if state.error.take().is_some() || !state.seen {
                    tracing::info!("fleet: etcd answers, through {member}");
                    self.journal.push(Event::new(
                        journal::Kind::Etcd,
                        None,
                        format!("etcd answers, through {member}"),
                    ));
                }
                state.seen = true;
                state.member = Some(member);
            }
            fleet::EtcdReport::Fails(e) => {
                if state.error.is_none() {
                    tracing::warn!("fleet: etcd: {e}; serving the last catalog and retrying");
                    self.journal.push(Event::new(
                        journal::Kind::Etcd,
                        None,
                        format!("etcd fails: {e}"),
                    ));
                } else {
                    tracing::debug!("fleet: etcd still failing: {e}");
                }
                state.error = Some(e);
                state.errors += 1;
            }
        }
    }

    /// For `status --fleet`: host id, etcd's state, and the catalog.
    pub fn fleet_view(&self) -> Option<(String, fleet::EtcdState, fleet::Instances)> {
        self.fleet
            .as_ref()
            .map(|f| (f.host_id.clone(), f.etcd.clone(), f.catalog.clone()))
    }

    /// The egress listeners: where each listens (once egress has an
    /// address), and the service behind it.
    pub fn egress_view(
        &self,
    ) -> Vec<(u16, Option<std::net::IpAddr>, crate::catalog::EgressService)> {
        let Some(f) = &self.fleet else {
            return Vec::new();
        };
        f.all_egress()
            .into_iter()
            .filter_map(|(port, e)| e.map(|e| (port, f.egress_ip, e)))
            .collect()
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

    /// What to carry out since the last call: orders, connections to
    /// close, owners to watch.
    pub fn take_outputs(&mut self) -> Outputs {
        std::mem::take(&mut self.out)
    }

    /// Sets how long Envoys get to reconnect after start (tests use zero).
    pub fn with_grace(mut self, grace: Duration) -> Registry {
        self.grace = grace;
        self
    }

    /// How every resource is built: telemetry, sniff timeout and limits.
    pub fn with_options(mut self, telemetry: Telemetry, serving: Serving) -> Registry {
        self.publisher.rebuild(telemetry, serving, &self.entries);
        self
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.publisher.subscribe()
    }

    /// A proxy connection opened: it can take orders from now on.
    pub fn link_opened(&mut self, conn: u64) {
        self.links.insert(conn);
    }

    /// Adds a mapping or confirms an identical one.
    pub fn register(&mut self, arrival: Arrival) -> Result<(), Refusal> {
        let Arrival {
            mapping,
            owner,
            conn,
            server,
            meta,
        } = arrival;
        if mapping.key.proto == Proto::Sctp {
            return Err(Refusal::Sctp);
        }
        if let Some(e) = self.entries.get(&mapping.key) {
            if e.mapping.backend != mapping.backend {
                if e.owner.pid != owner.pid && e.owner.alive() {
                    return Err(Refusal::Taken {
                        key: mapping.key,
                        pid: e.owner.pid,
                        backend: e.mapping.backend.addr(),
                    });
                }
                // The old owner is gone and has not been reaped yet.
                self.remove(&mapping.key, "replaced by a new registration", false);
            }
        }
        let container = match meta {
            Some(m) => Some(self.containers.remember(m, self.default_mode)),
            None => self.containers.serving(&mapping),
        };
        let fresh = !self.entries.contains_key(&mapping.key);
        let default_mode = self.default_mode;
        let entry = self
            .entries
            .entry(mapping.key)
            .or_insert_with(|| Entry::new(mapping, owner, conn, server, default_mode));
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
        if watch {
            self.out.watch.push((mapping.key, owner));
        }
        entry.server = server;
        let burst = fresh
            && mapping.key.proto == Proto::Tcp
            && self.burst.arrived(
                Instant::now(),
                mapping.backend.container_ip,
                mapping.key.host_port,
            );
        // With no Envoy to wait for, or in a burst of registrations (where
        // waiting would hold up every proxy dockerd starts after this one),
        // a relaying (or starting) proxy hears at once that it is to relay;
        // it is handed over as soon as Envoy serves the port.
        if server == Server::Relay && (self.envoys.is_empty() || burst) {
            if let Some(c) = conn.filter(|c| self.links.contains(c)) {
                self.out.orders.push((c, Reply::Serve(Server::Relay)));
            }
        }
        if fresh {
            self.metrics.registered();
            tracing::info!("registered {mapping} (pid {})", owner.pid);
            let text = format!("registered {mapping} (pid {})", owner.pid);
            self.note(journal::Kind::Register, &mapping.key, text);
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
        let handed_over = server == Server::Envoy && e.server != Server::Envoy;
        if handed_over {
            self.metrics.handed_over();
            tracing::info!("{} handed over to Envoy", e.mapping);
        }
        if e.server != server {
            e.server_since_ms = journal::now_ms();
        }
        e.server = server;
        if handed_over {
            self.note(journal::Kind::Handover, key, "handed over to Envoy");
        }
        self.evaluate_keys([*key]);
    }

    /// Removes a mapping. `closed` is told once no connected Envoy holds
    /// its listener any more, so the port is closed.
    pub fn deregister(&mut self, key: &MappingKey, closed: oneshot::Sender<()>) {
        self.closing.push((*key, closed));
        if self.remove(key, "deregistered", true) {
            self.send();
        }
        self.evaluate_keys([]);
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
        self.journal.push(Event::new(
            journal::Kind::Remove,
            Some(key),
            format!("removed {} ({why})", e.mapping),
        ));
        self.refresh(key);
        if let (false, Some(c)) = (by_owner, e.conn) {
            if self.links.remove(&c) {
                self.out.close.push(c);
            }
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
        self.entries.values().map(Entry::status).collect()
    }

    /// The mappings as the dashboard lists them.
    pub fn dash_rows(&self) -> Vec<DashRow> {
        self.entries.values().map(Entry::dash_row).collect()
    }

    /// One mapping in full, by its name in Envoy.
    pub fn detail(&self, id: &str) -> Option<Detail> {
        self.entries
            .values()
            .find(|e| e.listener() == id)
            .map(Entry::detail)
    }

    /// The last events, newest first.
    pub fn events(&self) -> Vec<Event> {
        self.journal.newest_first()
    }

    /// Whether Docker's API answers, as the watcher last said.
    pub fn docker_reach(&self) -> DockerReach {
        self.docker.clone()
    }

    /// The Docker watcher's word on whether Docker's API answers.
    pub fn set_docker_reach(&mut self, reach: DockerReach) {
        if reach == self.docker {
            return;
        }
        let text = match &reach {
            DockerReach::Following => "Docker answers; following its events".to_string(),
            DockerReach::Unreachable(why) => format!("Docker does not answer: {why}"),
            DockerReach::Unknown => return,
        };
        self.journal
            .push(Event::new(journal::Kind::Docker, None, text));
        self.docker = reach;
    }

    /// Records an event about one mapping, in the journal and in its row.
    fn note(&mut self, kind: journal::Kind, key: &MappingKey, text: impl Into<String>) {
        let event = Event::new(kind, Some(key), text);
        if let Some(e) = self.entries.get_mut(key) {
            e.events.push(event.clone());
        }
        self.journal.push(event);
    }

    /// Docker told us about a container (after its start, a rename or a
    /// health change): name its mappings after it and apply its mode.
    pub fn apply_container(&mut self, meta: ContainerMeta) {
        // The same facts again (a Docker reconnect lists every container)
        // are no event.
        let news = self.containers.get(&meta.id) != Some(&meta);
        let meta = self.containers.remember(meta, self.default_mode);
        let default_mode = self.default_mode;
        let mut changed = Vec::new();
        let mut served = Vec::new();
        for e in self.entries.values_mut() {
            let b = e.mapping.backend;
            if !meta.serves(b.container_ip, b.container_port, e.mapping.key.proto) {
                continue;
            }
            e.container = Some(meta.clone());
            served.push(e.mapping.key);
            if e.describe(default_mode) {
                tracing::info!("{} is now {} ({})", e.mapping, e.name, e.mode.as_str());
                changed.push(e.mapping.key);
            }
        }
        // Only containers that publish something here make an event.
        if news && !served.is_empty() {
            self.journal.push(Event::new(
                journal::Kind::Docker,
                None,
                format!(
                    "container {} ({}) is up, image {}, {} mapping(s){}",
                    meta.name,
                    short_id(&meta.id),
                    meta.image,
                    served.len(),
                    meta.health
                        .map(|h| format!(", {h:?}").to_lowercase())
                        .unwrap_or_default()
                ),
            ));
        }
        for key in &changed {
            self.refresh(key);
        }
        // Health and fleet labels change no xDS resource of the mapping,
        // but may change its catalog instance.
        let mut fleet_changed = false;
        if let Some(f) = &mut self.fleet {
            for key in &served {
                fleet_changed |= f.refresh(key, self.entries.get(key));
            }
        }
        // With the mesh, any container may be a caller with an identity.
        if !changed.is_empty() || fleet_changed || self.mesh.is_some() {
            self.send();
        }
    }

    /// The container is gone: its address may be reused by the next one.
    pub fn forget_container(&mut self, id: &str) {
        // Docker says `die`, then `destroy`: one event, for the first.
        if self.containers.forget(id) {
            self.journal.push(Event::new(
                journal::Kind::Docker,
                None,
                format!("container {} stopped", short_id(id)),
            ));
            if self.mesh.is_some() {
                self.send();
            }
        }
    }

    /// An xDS stream named the right node in its first request: from now
    /// on it counts as an Envoy, known by the stream's number.
    pub fn envoy_connected(&mut self, stream: u64) -> u64 {
        let view = EnvoyView {
            stream,
            ..Default::default()
        };
        self.envoys.insert(stream, view);
        self.seen_envoy = true;
        self.journal.push(Event::new(
            journal::Kind::Envoy,
            None,
            format!("Envoy stream {stream} connected"),
        ));
        self.evaluate();
        stream
    }

    /// Which ADS flavour an Envoy's stream speaks.
    pub fn set_envoy_flavor(&mut self, id: u64, flavor: crate::xds::session::Flavor) {
        if let Some(v) = self.envoys.get_mut(&id) {
            v.flavor = Some(match flavor {
                crate::xds::session::Flavor::Delta => "delta",
                crate::xds::session::Flavor::Sotw => "sotw",
            });
        }
    }

    /// Each Envoy's stream and its ADS flavour.
    pub fn envoy_flavors(&self) -> Vec<(u64, Option<&'static str>)> {
        self.envoys.values().map(|v| (v.stream, v.flavor)).collect()
    }

    pub fn envoy_gone(&mut self, id: u64) {
        if self.envoys.remove(&id).is_some() {
            self.journal.push(Event::new(
                journal::Kind::Envoy,
                None,
                format!("Envoy stream {id} went away"),
            ));
        }
        self.evaluate();
    }

    pub fn envoy_count(&self) -> usize {
        self.envoys.len()
    }

    /// An Envoy stopped answering (`true`) or answers again.
    pub fn envoy_stalled(&mut self, id: u64, stalled: bool) {
        if let Some(v) = self.envoys.get_mut(&id) {
            if v.stalled.is_some() != stalled {
                self.journal.push(Event::new(
                    journal::Kind::Envoy,
                    None,
                    match stalled {
                        true => format!("Envoy stream {id} stopped answering"),
                        false => format!("Envoy stream {id} answers again"),
                    },
                ));
            }
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
        if let (Some(error), false) = (&fb.error, fb.kind == Kind::Listener) {
            self.journal.push(Event::new(
                journal::Kind::Nack,
                None,
                format!("Envoy stream {id} rejected {:?}: {error}", fb.kind),
            ));
        }
        match fb.kind {
            Kind::Listener => view.listeners = Some(fb.held),
            Kind::Endpoint => view.endpoints = fb.held,
            Kind::Cluster | Kind::Secret => return,
        }
        // Only the mappings whose resources this answer was about.
        let touched: Vec<MappingKey> = match &fb.touched {
            Some(names) => names
                .iter()
                .filter_map(|n| self.publisher.mapping_of(n))
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
            let text = format!("Envoy stream {id} rejected the listener: {error}");
            self.note(journal::Kind::Nack, key, text);
        }
        if rejected.is_empty() {
            self.journal.push(Event::new(
                journal::Kind::Nack,
                None,
                format!("Envoy stream {id} rejected listeners: {error}"),
            ));
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
                snap: self.publisher.snap(),
                metrics: &self.metrics,
                waiting_for_envoys,
                claimed: self.applied.as_ref(),
            };
            let before = e.server;
            let order = judge(e, &world);
            if e.server != before {
                e.server_since_ms = journal::now_ms();
            }
            if let Some(order) = order {
                if order.1 == Reply::Serve(Server::Relay) {
                    let event = Event::new(
                        journal::Kind::Takeback,
                        Some(&key),
                        "no Envoy serves it any more: its proxy takes it back",
                    );
                    e.events.push(event.clone());
                    self.journal.push(event);
                }
                self.out.orders.push(order);
            }
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
        self.publisher.set(key, self.entries.get(key));
        let held = self.entries.contains_key(key) && crate::nft::ruleset::set_of(key).is_some();
        self.claims.send_if_modified(|c| match held {
            true => c.insert(*key),
            false => c.remove(key),
        });
        if let Some(f) = &mut self.fleet {
            f.refresh(key, self.entries.get(key));
        }
    }

    /// Sends the snapshot, after bringing egress up to date with the local
    /// instances and the catalog.
    fn send(&mut self) {
        if let (Some(m), Some(f)) = (&mut self.mesh, &mut self.fleet) {
            let ingress = m.ingress(f);
            let egress = m.update(&ingress, mesh::LocalMesh::callers(&self.containers));
            self.publisher.set_ingress(&m.mesh, ingress);
            if self.publisher.set_mesh_egress(Some(egress)) {
                f.reset_egress();
            }
        }
        if let Some(f) = &mut self.fleet {
            f.flush();
            if let Some(ip) = f.egress_ip {
                for (port, e) in f.egress_changes() {
                    self.publisher.set_egress(port, ip, e.as_ref());
                }
            }
        }
        self.publisher.send();
    }
}

/// Docker's short container id, as `docker ps` shows it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// How many catalog keys are new in `new`, and how many left `old`.
fn catalog_diff(old: &fleet::Instances, new: &fleet::Instances) -> (usize, usize) {
    let added = new.keys().filter(|k| !old.contains_key(*k)).count();
    let gone = old.keys().filter(|k| !new.contains_key(*k)).count();
    (added, gone)
}
