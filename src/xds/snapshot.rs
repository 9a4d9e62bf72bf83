//! One consistent set of xDS resources built from the registrar's state.
//! The registrar publishes a new snapshot on every change through a watch
//! channel; each Envoy stream reads the newest one.
//!
//! The maps are persistent (`imbl`): a snapshot is cloned in O(1), one
//! resource is set or removed in O(log n), and two snapshots that share
//! most of their nodes are compared in time proportional to what differs.
//! So one change costs about the same whether 10 or 2,000 mappings exist.

use super::resource::{Resource, Service, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE};
use super::resources;
use super::serving::Serving;
use super::telemetry::{self, Telemetry};
use std::sync::Arc;

/// The resource types the registrar serves: the three of every mapping,
/// and the mesh's certificates (SDS), which only `serve --mesh` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Cluster = 0,
    Endpoint = 1,
    Listener = 2,
    Secret = 3,
}

impl Kind {
    /// Make-before-break order: clusters, then their endpoints, then the
    /// listeners that use them.
    pub const ORDER: [Kind; 3] = [Kind::Cluster, Kind::Endpoint, Kind::Listener];
    /// Every type, in the order a stream answers them: secrets first, so
    /// that clusters and listeners that name them find them.
    pub const ALL: [Kind; 4] = [Kind::Secret, Kind::Cluster, Kind::Endpoint, Kind::Listener];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cluster => CLUSTER_TYPE,
            Kind::Endpoint => ENDPOINT_TYPE,
            Kind::Listener => LISTENER_TYPE,
            Kind::Secret => SECRET_TYPE,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Whether Envoy names what it wants of this type (assignments and
    /// secrets) rather than taking all (clusters and listeners).
    pub fn named(self) -> bool {
        matches!(self, Kind::Endpoint | Kind::Secret)
    }

    pub fn short(self) -> &'static str {
        match self {
            Kind::Cluster => "CDS",
            Kind::Endpoint => "EDS",
            Kind::Listener => "LDS",
            Kind::Secret => "SDS",
        }
    }
}

pub type Resources = imbl::OrdMap<String, Arc<Resource>>;

#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    by_kind: [Resources; 4],
}

impl Snapshot {
    pub fn build<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        t: &Telemetry,
        s: &Serving,
    ) -> Snapshot {
        let mut snap = Snapshot::default();
        for svc in services {
            for (kind, res) in [
                (Kind::Cluster, resources::cluster(svc, s)),
                (Kind::Endpoint, resources::endpoints(svc)),
                (Kind::Listener, resources::listener(svc, t, s)),
            ] {
                snap.by_kind[kind as usize].insert(res.name.clone(), Arc::new(res));
            }
        }
        if let Some(tracer) = &t.tracer {
            let res = telemetry::collector_cluster(tracer);
            snap.by_kind[Kind::Cluster as usize].insert(res.name.clone(), Arc::new(res));
        }
        snap
    }

    pub fn get(&self, kind: Kind) -> &Resources {
        &self.by_kind[kind as usize]
    }

    /// Adds or replaces one resource.
    pub fn set(&mut self, kind: Kind, res: Arc<Resource>) {
        self.by_kind[kind as usize].insert(res.name.clone(), res);
    }

    /// Removes one resource, if present.
    pub fn remove(&mut self, kind: Kind, name: &str) {
        self.by_kind[kind as usize].remove(name);
    }
}
