//! The registrar's state: every live mapping, who owns it, and what each
//! connected Envoy has accepted. Every change publishes a new xDS snapshot
//! and settles the proxies waiting for Envoy's verdict.
//!
//! A mapping is keyed by (proto, host ip, host port). It dies when its
//! proxy deregisters, when the proxy's connection closes, or (for mappings
//! taken from /proc or replayed by resync) when the owning process exits.

use super::docker::meta::ContainerMeta;
use super::metrics::METRICS;
use crate::mapping::{ContainerRef, Mapping, MappingKey, MappingState, MappingStatus, Mode, Proto};
use crate::xds::resources::Service;
use crate::xds::session::{mentions, Feedback};
use crate::xds::snapshot::{Kind, Snapshot};
use crate::xds::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

/// Envoy's verdict, as a waiting proxy hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready,
    Failed(String),
}

/// The process that keeps a mapping alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerProcess {
    pub pid: u32,
    /// Start time from /proc/PID/stat, so a reused pid is not mistaken for
    /// the owner. `None` if /proc could not tell.
    pub start: Option<u64>,
}

impl OwnerProcess {
    pub fn of(pid: u32) -> OwnerProcess {
        OwnerProcess {
            pid,
            start: proc_start(pid),
        }
    }

    pub fn alive(&self) -> bool {
        let Ok(stat) = procfs::process::Process::new(self.pid as i32).and_then(|p| p.stat()) else {
            return false;
        };
        // A killed proxy stays a zombie until its parent reaps it; it serves
        // nothing any more.
        stat.state != 'Z' && self.start.is_none_or(|s| s == stat.starttime)
    }
}

fn proc_start(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

#[derive(Debug)]
struct Entry {
    mapping: Mapping,
    mode: Mode,
    name: String,
    owner: OwnerProcess,
    /// The registrar connection this mapping lives with, if any.
    conn: Option<u64>,
    state: MappingState,
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// The container behind the mapping, once Docker has told us.
    container: Option<Arc<ContainerMeta>>,
    /// When it was registered, until every Envoy has ACKed it once.
    since: Option<std::time::Instant>,
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

    fn settle(&mut self, outcome: Outcome) {
        for w in self.waiters.drain(..) {
            let _ = w.send(outcome.clone());
        }
    }
}

/// What one connected Envoy holds, name to version.
#[derive(Debug, Default)]
struct EnvoyView {
    /// From its last LDS ACK or NACK (or its first request); `None` before.
    listeners: Option<BTreeMap<String, String>>,
    endpoints: BTreeMap<String, String>,
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
    /// Deregistrations waiting for every Envoy to drop their listener.
    closing: Vec<(MappingKey, oneshot::Sender<()>)>,
    /// Containers Docker told us about, by id.
    containers: BTreeMap<String, Arc<ContainerMeta>>,
    /// Tracing and access logs, as Envoy gets them with every listener.
    telemetry: Telemetry,
}

pub type Shared = Arc<Mutex<Registry>>;

/// What `register` gives back when the caller wants to wait.
pub type Verdict = oneshot::Receiver<Outcome>;

impl Registry {
    pub fn new(default_mode: Mode) -> Registry {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        Registry {
            entries: BTreeMap::new(),
            default_mode,
            envoys: BTreeMap::new(),
            next_envoy: 0,
            snapshots,
            closing: Vec::new(),
            containers: BTreeMap::new(),
            telemetry: Telemetry::default(),
        }
    }

    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Registry {
        self.telemetry = telemetry;
        self.publish();
        self
    }

    pub fn shared(self) -> Shared {
        Arc::new(Mutex::new(self))
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// Adds a mapping or confirms an identical one. `meta` is the container
    /// found for it at registration, if any. With `wait`, returns a
    /// receiver for Envoy's verdict.
    pub fn register(
        &mut self,
        mapping: Mapping,
        owner: OwnerProcess,
        conn: Option<u64>,
        wait: bool,
        meta: Option<ContainerMeta>,
    ) -> Result<Option<Verdict>, String> {
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
                self.remove(&mapping.key, "replaced by a new registration");
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
            waiters: Vec::new(),
            container: None,
            since: Some(std::time::Instant::now()),
        });
        if container.is_some() && entry.container != container {
            entry.container = container;
            let changed = entry.describe(default_mode);
            if changed && !fresh {
                self.publish();
            }
        }
        let entry = self.entries.get_mut(&mapping.key).expect("just inserted");
        // Idempotent: the newest registrant owns the mapping from now on.
        entry.owner = owner;
        entry.conn = conn;
        let rx = wait.then(|| {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            rx
        });
        if let MappingState::Failed(e) = &entry.state {
            let e = e.clone();
            entry.settle(Outcome::Failed(e));
        }
        if fresh {
            METRICS.registered();
            tracing::info!("registered {mapping} (pid {})", owner.pid);
            self.publish();
        }
        self.evaluate();
        Ok(rx)
    }

    /// Removes a mapping. The receiver resolves once no connected Envoy
    /// holds its listener any more, so the port is closed.
    pub fn deregister(&mut self, key: &MappingKey) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.closing.push((*key, tx));
        if self.remove(key, "deregistered") {
            self.publish();
        }
        self.evaluate();
        rx
    }

    /// A registrar connection closed: its mappings go with it.
    pub fn connection_closed(&mut self, conn: u64) {
        let gone: Vec<MappingKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.conn == Some(conn))
            .map(|(k, _)| *k)
            .collect();
        self.remove_all(&gone, "its proxy went away");
    }

    /// Drops mappings whose owning process has exited.
    pub fn reap(&mut self) {
        let gone: Vec<MappingKey> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.owner.alive())
            .map(|(k, _)| *k)
            .collect();
        self.remove_all(&gone, "its proxy exited");
    }

    fn remove_all(&mut self, keys: &[MappingKey], why: &str) {
        let mut changed = false;
        for k in keys {
            changed |= self.remove(k, why);
        }
        if changed {
            self.publish();
            self.evaluate();
        }
    }

    fn remove(&mut self, key: &MappingKey, why: &str) -> bool {
        let Some(mut e) = self.entries.remove(key) else {
            return false;
        };
        METRICS.deregistered();
        tracing::info!("removed {} ({why})", e.mapping);
        e.settle(Outcome::Failed(format!("mapping {why}")));
        true
    }

    pub fn list(&self) -> Vec<MappingStatus> {
        self.entries
            .values()
            .map(|e| MappingStatus {
                mapping: e.mapping,
                mode: e.mode,
                name: e.name.clone(),
                state: e.state.clone(),
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
        let mut changed = false;
        for e in self.entries.values_mut() {
            let b = e.mapping.backend;
            if !meta.serves(b.container_ip, b.container_port, e.mapping.key.proto) {
                continue;
            }
            e.container = Some(meta.clone());
            if e.describe(default_mode) {
                tracing::info!("{} is now {} ({})", e.mapping, e.name, e.mode.as_str());
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
    }

    /// The container is gone: its address may be reused by the next one.
    pub fn forget_container(&mut self, id: &str) {
        self.containers.remove(id);
    }

    pub fn envoy_connected(&mut self) -> u64 {
        self.next_envoy += 1;
        self.envoys.insert(self.next_envoy, EnvoyView::default());
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

    /// An ACK or NACK from one Envoy, or what its first request said it holds.
    pub fn envoy_feedback(&mut self, id: u64, fb: Feedback) {
        let Some(view) = self.envoys.get_mut(&id) else {
            return;
        };
        match fb.kind {
            Kind::Listener => view.listeners = Some(fb.held),
            Kind::Endpoint => {
                view.endpoints = fb.held;
                self.evaluate();
                return;
            }
            Kind::Cluster => return,
        }
        let Some(error) = fb.error else {
            self.evaluate();
            return;
        };
        let rejected: Vec<MappingKey> = self
            .entries
            .values()
            .filter(|e| mentions(&error, &e.listener()))
            .map(|e| e.mapping.key)
            .collect();
        for key in &rejected {
            let Some(e) = self.entries.get_mut(key) else {
                continue;
            };
            if e.state == MappingState::Pending {
                // A starting proxy fails, as docker-proxy does when its bind
                // fails, and the mapping is forgotten.
                e.settle(Outcome::Failed(error.clone()));
                self.entries.remove(key);
                tracing::warn!("Envoy rejected {key}, forgetting it: {error}");
            } else {
                tracing::warn!("Envoy rejected the listener of live {key}: {error}");
                e.state = MappingState::Failed(error.clone());
            }
        }
        if !rejected.is_empty() {
            self.publish();
        }
        self.evaluate();
    }

    /// Recomputes each TCP mapping's state from what the Envoys hold, and
    /// answers the proxies waiting for it.
    fn evaluate(&mut self) {
        let snap = self.snapshots.borrow().clone();
        let held =
            |envoys: &BTreeMap<u64, EnvoyView>, name: &str| envoys.values().any(|v| v.holds(name));
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.closing)
            .into_iter()
            .partition(|(key, _)| {
                self.entries.contains_key(key) || !held(&self.envoys, &key.resource_name())
            });
        self.closing = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
        for e in self.entries.values_mut() {
            let name = e.listener();
            let served = e.mapping.key.proto != Proto::Tcp
                || self.envoys.values().all(|v| v.serves(&snap, &name));
            if served {
                if let Some(since) = e.since.take() {
                    if !self.envoys.is_empty() && e.mapping.key.proto == Proto::Tcp {
                        METRICS.ready_after(since.elapsed());
                    }
                }
                e.state = MappingState::Active;
                e.settle(Outcome::Ready);
            } else if e.state == MappingState::Active {
                e.state = MappingState::Pending;
            }
        }
    }

    fn publish(&self) {
        let services: Vec<Service> = self
            .entries
            .values()
            .filter(|e| e.mapping.key.proto == Proto::Tcp)
            .map(|e| {
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
            })
            .collect();
        self.snapshots
            .send_replace(Arc::new(Snapshot::build(&services, &self.telemetry)));
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
    fn ack(r: &mut Registry, envoy: u64, kind: Kind) {
        let held = r
            .snapshots()
            .borrow()
            .get(kind)
            .iter()
            .map(|(n, res)| (n.clone(), res.version.clone()))
            .collect();
        r.envoy_feedback(
            envoy,
            Feedback {
                kind,
                held,
                error: None,
            },
        );
    }

    #[test]
    fn same_backend_is_a_no_op_and_another_is_a_conflict() {
        let mut r = Registry::new(Mode::Http);
        let rx = r.snapshots();
        r.register(mapping(80, "10.0.0.2"), me(), Some(1), false, None)
            .unwrap();
        let v1 = rx.borrow().get(Kind::Listener).len();
        r.register(mapping(80, "10.0.0.2"), me(), Some(2), false, None)
            .unwrap();
        assert_eq!(r.list().len(), 1);
        assert_eq!(v1, 1);
        let other = OwnerProcess::of(1);
        let err = r
            .register(mapping(80, "10.0.0.3"), other, None, false, None)
            .unwrap_err();
        assert!(err.contains("already registered"), "{err}");
        // The connection that registered last owns it now.
        r.connection_closed(1);
        assert_eq!(r.list().len(), 1);
        r.connection_closed(2);
        assert!(r.list().is_empty());
    }

    #[test]
    fn no_envoy_means_ready_at_once_and_an_envoy_must_ack_first() {
        let mut r = Registry::new(Mode::Http);
        let mut rx = r
            .register(mapping(80, "10.0.0.2"), me(), Some(1), true, None)
            .unwrap()
            .unwrap();
        assert_eq!(rx.try_recv().unwrap(), Outcome::Ready);

        let envoy = r.envoy_connected();
        let m = mapping(81, "10.0.0.2");
        let mut rx = r.register(m, me(), Some(1), true, None).unwrap().unwrap();
        assert!(rx.try_recv().is_err());
        // The listener alone is not enough: its endpoints must be there too.
        ack(&mut r, envoy, Kind::Listener);
        assert!(rx.try_recv().is_err());
        ack(&mut r, envoy, Kind::Endpoint);
        assert_eq!(rx.try_recv().unwrap(), Outcome::Ready);
    }

    #[test]
    fn a_nack_fails_the_pending_mapping_and_forgets_it() {
        let mut r = Registry::new(Mode::Tcp);
        let envoy = r.envoy_connected();
        let m = mapping(80, "10.0.0.2");
        let mut rx = r.register(m, me(), Some(1), true, None).unwrap().unwrap();
        let error = format!(
            "Error adding/updating listener(s) {}: cannot bind '0.0.0.0:80': Address already in use",
            m.key.resource_name()
        );
        r.envoy_feedback(
            envoy,
            Feedback {
                kind: Kind::Listener,
                held: BTreeMap::new(),
                error: Some(error.clone()),
            },
        );
        assert_eq!(rx.try_recv().unwrap(), Outcome::Failed(error));
        assert!(r.list().is_empty());
    }

    #[test]
    fn container_labels_name_mappings_and_set_their_mode() {
        let mut r = Registry::new(Mode::Http);
        let rx = r.snapshots();
        let m = mapping(8080, "172.17.0.2");
        r.register(m, me(), Some(1), false, None).unwrap();
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
        r.register(mapping(8081, "172.17.0.2"), me(), Some(1), false, None)
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
        r.register(mapping(80, "10.0.0.2"), dead, None, false, None)
            .unwrap();
        r.register(mapping(81, "10.0.0.2"), me(), None, false, None)
            .unwrap();
        r.reap();
        assert_eq!(r.list().len(), 1);
        let mut m = mapping(82, "10.0.0.2");
        m.key.proto = Proto::Sctp;
        assert!(r.register(m, me(), None, false, None).is_err());
    }
}
