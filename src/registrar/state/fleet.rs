//! The registry's side of the fleet: which of this host's mappings are
//! catalog instances (one per published TCP mapping of a known, discoverable
//! container), the catalog as last read from etcd, and the egress services
//! that follow from both. `registrar::fleet` moves the instances to etcd
//! and the catalog back; this module does no I/O.
//!
//! - An instance is kept per mapping and recomputed only when that mapping
//!   or its container changes; the whole set goes out on a watch channel.
//! - Mappings on a loopback address are not reachable from other hosts and
//!   are left out; so is the unspecified address of the family the
//!   advertised address is not in (Docker publishes `0.0.0.0` and `::`
//!   for one `-p`, which is one instance).
//! - Egress is rebuilt from the catalog plus the local instances (see
//!   `catalog::merge`) after each change of either, and only the service
//!   ports whose result changed are republished.

use super::entry::{service, Entry};
use crate::catalog::{self, ContainerInfo, EgressService, Health, Instance};
use crate::mapping::{MappingKey, Proto};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Instances by catalog key.
pub type Instances = Arc<BTreeMap<String, Instance>>;

/// What `status --fleet`, `/healthz` and `/metrics` say about etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdState {
    /// The last error, while etcd cannot be reached; `None` once it answers.
    pub error: Option<String>,
    /// The member the catalog's watch is on, once etcd answers.
    pub member: Option<String>,
    /// Set once etcd has answered at least once.
    pub seen: bool,
    /// Failed calls to etcd, in all.
    pub errors: u64,
}

/// How the fleet task's last dealings with etcd went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdReport {
    /// etcd answers; the catalog's watch is on `member`.
    Answers { member: String },
    /// A call failed, with why.
    Fails(String),
}

/// One local catalog instance, with what the mesh ingress needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Local {
    pub key: String,
    pub instance: Instance,
    /// The container's address and port that serve it.
    pub backend: std::net::SocketAddr,
    /// Its container's `MeshAllow` label, as written.
    pub allow: Option<String>,
}

#[derive(Debug)]
pub(super) struct LocalFleet {
    pub host_id: String,
    advertise: IpAddr,
    local: BTreeMap<MappingKey, Local>,
    /// This host's mesh port, with `serve --mesh`: every instance carries it.
    pub mesh_port: Option<u16>,
    tx: watch::Sender<Instances>,
    /// Local instances changed since they were last sent.
    dirty: bool,
    /// Everything etcd holds, as last read (other hosts' and ours).
    pub catalog: Instances,
    /// Local instances or the catalog changed since egress was computed.
    stale: bool,
    pub egress_ip: Option<IpAddr>,
    /// The egress services as published, by service port.
    egress: BTreeMap<u16, EgressService>,
    pub etcd: EtcdState,
}

impl LocalFleet {
    pub fn new(host_id: String, advertise: IpAddr) -> LocalFleet {
        let (tx, _) = watch::channel(Instances::default());
        LocalFleet {
            host_id,
            advertise,
            local: BTreeMap::new(),
            mesh_port: None,
            tx,
            dirty: false,
            catalog: Instances::default(),
            stale: false,
            egress_ip: None,
            egress: BTreeMap::new(),
            etcd: EtcdState::default(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Instances> {
        self.tx.subscribe()
    }

    /// Recomputes the instance of one mapping (`None`: it is gone); true
    /// if it changed.
    pub fn refresh(&mut self, key: &MappingKey, entry: Option<&Entry>) -> bool {
        let now = entry.and_then(|e| self.instance_of(e));
        if self.local.get(key) == now.as_ref() {
            return false;
        }
        match now {
            Some(i) => self.local.insert(*key, i),
            None => self.local.remove(key),
        };
        self.dirty = true;
        true
    }

    fn instance_of(&self, e: &Entry) -> Option<Local> {
        let c = e.container.as_ref().filter(|c| c.discoverable())?;
        let k = e.mapping.key;
        if k.proto != Proto::Tcp || k.host_ip.is_loopback() {
            return None;
        }
        let ip = if k.host_ip.is_unspecified() {
            if k.host_ip.is_ipv4() != self.advertise.is_ipv4() {
                return None;
            }
            self.advertise
        } else {
            k.host_ip
        };
        let svc = service(e);
        let container_port = e.mapping.backend.container_port;
        let i = Instance {
            service: svc.service.clone(),
            environment: svc.environment.clone(),
            host_id: self.host_id.clone(),
            address: (ip, k.host_port).into(),
            mode: e.mode,
            container: ContainerInfo {
                name: c.name.clone(),
                id: c.id.clone(),
            },
            image: c.image.clone(),
            // No HEALTHCHECK: healthy while it runs.
            health: c.health.unwrap_or(Health::Healthy),
            service_port: c.service_port(container_port),
            // A label that is not understood was logged when the container
            // was first seen; the instance goes on without a check.
            check: c.check(container_port, k.host_port).ok().flatten(),
            mesh_port: self.mesh_port,
        };
        match catalog::key(&i.service, &self.host_id, &k.resource_name()) {
            Ok(key) => Some(Local {
                key,
                instance: i,
                backend: (e.mapping.backend.container_ip, container_port).into(),
                allow: c.mesh_allow().map(String::from),
            }),
            Err(e) => {
                tracing::warn!("{} is not published to the fleet: {e}", e_name(&i));
                None
            }
        }
    }

    /// Sends the local instances if they changed; true if so.
    pub fn flush(&mut self) -> bool {
        if !std::mem::take(&mut self.dirty) {
            return false;
        }
        let all: BTreeMap<String, Instance> = self
            .local
            .values()
            .map(|l| (l.key.clone(), l.instance.clone()))
            .collect();
        self.tx.send_replace(Arc::new(all));
        self.stale = true;
        true
    }

    pub fn set_catalog(&mut self, catalog: Instances) {
        self.catalog = catalog;
        self.stale = true;
    }

    /// Egress is to be published from scratch (its address changed).
    pub fn reset_egress(&mut self) {
        self.egress.clear();
        self.stale = true;
    }

    /// The egress services that differ from what was published: the new
    /// value, or `None` for a service port that is gone.
    pub fn egress_changes(&mut self) -> Vec<(u16, Option<EgressService>)> {
        if self.egress_ip.is_none() || !std::mem::take(&mut self.stale) {
            return Vec::new();
        }
        let local: Vec<Instance> = self.local.values().map(|l| l.instance.clone()).collect();
        let (now, conflicts) = catalog::merge(self.catalog.values(), &local, &self.host_id);
        for c in conflicts {
            tracing::warn!("fleet: {c}");
        }
        let mut out = Vec::new();
        for port in self.egress.keys() {
            if !now.contains_key(port) {
                out.push((*port, None));
            }
        }
        for (port, e) in &now {
            if self.egress.get(port) != Some(e) {
                out.push((*port, Some(e.clone())));
            }
        }
        self.egress = now;
        out
    }

    /// This host's instances, for the mesh ingress.
    pub fn locals(&self) -> impl Iterator<Item = &Local> {
        self.local.values()
    }

    /// Every egress service, for a rebuild.
    pub fn all_egress(&self) -> Vec<(u16, Option<EgressService>)> {
        self.egress
            .iter()
            .map(|(p, e)| (*p, Some(e.clone())))
            .collect()
    }
}

fn e_name(i: &Instance) -> String {
    format!("{} ({})", i.service, i.address)
}
