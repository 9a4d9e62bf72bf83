//! Publishing into the xDS cache: each mapping's cluster, assignment and
//! listener go into the snapshot being edited, one mapping at a time, and a
//! clone (O(1)) goes to every Envoy stream on a watch channel. Also which
//! mapping a resource name belongs to, so an ACK re-judges only those. The
//! fleet's egress resources go in the same way, one service port at a time.

use super::entry::{service, Entry};
use crate::catalog::EgressService;
use crate::mapping::{MappingKey, Proto};
use crate::xds::mesh::{self, Ingress, Mesh, MeshEgress};
use crate::xds::resource::Resource;
use crate::xds::serving::Serving;
use crate::xds::snapshot::{Kind, Snapshot};
use crate::xds::telemetry::Telemetry;
use crate::xds::{egress, resources};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug)]
pub(super) struct Publisher {
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// The snapshot being edited; each change sets or removes only the
    /// resources of the mappings it touches, then a clone is sent.
    snap: Snapshot,
    /// The resources each mapping put into `snap`, to take out again.
    published: BTreeMap<MappingKey, Vec<(Kind, String)>>,
    /// Resource name (listener or cluster) to its mapping.
    by_name: BTreeMap<String, MappingKey>,
    /// Tracing and access logs, as Envoy gets them with every listener.
    telemetry: Telemetry,
    /// Sniff timeout and limits, likewise.
    serving: Serving,
    /// The resources of each egress service port in `snap`.
    egress: BTreeMap<u16, Vec<(Kind, String)>>,
    /// With the mesh: what egress needs of it.
    mesh_egress: Option<MeshEgress>,
    /// The mesh ingress's resources in `snap`, and what they were built from.
    ingress: Vec<(Kind, String)>,
    ingress_from: Option<(Mesh, Vec<Ingress>)>,
}

impl Publisher {
    pub fn new() -> Publisher {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        Publisher {
            snapshots,
            snap: Snapshot::default(),
            published: BTreeMap::new(),
            by_name: BTreeMap::new(),
            telemetry: Telemetry::default(),
            serving: Serving::default(),
            egress: BTreeMap::new(),
            mesh_egress: None,
            ingress: Vec::new(),
            ingress_from: None,
        }
    }

    /// What egress needs of the mesh (`None`: no mesh); true if it changed,
    /// and then every egress port must be set again.
    pub fn set_mesh_egress(&mut self, m: Option<MeshEgress>) -> bool {
        if self.mesh_egress == m {
            return false;
        }
        self.mesh_egress = m;
        true
    }

    /// Puts the mesh ingress as `services` make it into the snapshot, if
    /// that differs from what is there.
    pub fn set_ingress(&mut self, mesh: &Mesh, services: Vec<Ingress>) {
        let from = Some((mesh.clone(), services));
        if self.ingress_from == from {
            return;
        }
        for (kind, name) in self.ingress.drain(..) {
            self.snap.remove(kind, &name);
        }
        let (mesh, services) = from.as_ref().expect("just set");
        let (clusters, assignments, listener) =
            mesh::ingress(mesh, services, &self.telemetry, &self.serving);
        let all = clusters
            .into_iter()
            .map(|r| (Kind::Cluster, r))
            .chain(assignments.into_iter().map(|r| (Kind::Endpoint, r)))
            .chain(listener.map(|r| (Kind::Listener, r)));
        for (kind, res) in all {
            self.ingress.push((kind, res.name.clone()));
            self.snap.set(kind, Arc::new(res));
        }
        self.ingress_from = from;
    }

    /// Sets one secret (`Some`) or takes it out.
    pub fn set_secret(&mut self, name: &str, res: Option<Resource>) {
        match res {
            Some(r) => self.snap.set(Kind::Secret, Arc::new(r)),
            None => self.snap.remove(Kind::Secret, name),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// The snapshot as edited so far (what Envoys are judged against).
    pub fn snap(&self) -> &Snapshot {
        &self.snap
    }

    /// The mapping a listener or cluster name belongs to.
    pub fn mapping_of(&self, name: &str) -> Option<MappingKey> {
        self.by_name.get(name).copied()
    }

    /// Puts the mapping's resources into the snapshot as `entry` has them
    /// now, or takes them out (`None`, or not TCP): O(log n).
    pub fn set(&mut self, key: &MappingKey, entry: Option<&Entry>) {
        for (kind, name) in self.published.remove(key).unwrap_or_default() {
            self.snap.remove(kind, &name);
            self.by_name.remove(&name);
        }
        let Some(e) = entry.filter(|e| e.mapping.key.proto == Proto::Tcp) else {
            return;
        };
        let svc = service(e);
        let mut names = Vec::with_capacity(3);
        for (kind, res) in [
            (Kind::Cluster, resources::cluster(&svc, &self.serving)),
            (Kind::Endpoint, resources::endpoints(&svc)),
            (
                Kind::Listener,
                resources::listener(&svc, &self.telemetry, &self.serving),
            ),
        ] {
            names.push((kind, res.name.clone()));
            self.by_name.insert(res.name.clone(), *key);
            self.snap.set(kind, Arc::new(res));
        }
        self.published.insert(*key, names);
    }

    /// Puts one egress service port's resources into the snapshot, or takes
    /// them out (`None`).
    pub fn set_egress(&mut self, port: u16, ip: IpAddr, e: Option<&EgressService>) {
        for (kind, name) in self.egress.remove(&port).unwrap_or_default() {
            self.snap.remove(kind, &name);
        }
        let Some(e) = e else { return };
        let out = egress::build(
            port,
            ip,
            e,
            &self.telemetry,
            &self.serving,
            self.mesh_egress.as_ref(),
        );
        let mut names = Vec::with_capacity(3);
        let more = out
            .identity_clusters
            .into_iter()
            .map(|c| (Kind::Cluster, c));
        for (kind, res) in [
            (Kind::Cluster, out.cluster),
            (Kind::Endpoint, out.endpoints),
            (Kind::Listener, out.listener),
        ]
        .into_iter()
        .chain(more)
        {
            names.push((kind, res.name.clone()));
            self.snap.set(kind, Arc::new(res));
        }
        self.egress.insert(port, names);
    }

    /// Sends the edited snapshot to every Envoy stream: a clone in O(1).
    pub fn send(&self) {
        self.snapshots.send_replace(Arc::new(self.snap.clone()));
    }

    /// New telemetry or serving options: every resource is built again,
    /// and sent.
    pub fn rebuild<'a>(
        &mut self,
        telemetry: Telemetry,
        serving: Serving,
        entries: impl IntoIterator<Item = (&'a MappingKey, &'a Entry)>,
    ) {
        self.telemetry = telemetry;
        self.serving = serving;
        let secrets = self.snap.get(Kind::Secret).clone();
        self.snap = Snapshot::build(std::iter::empty(), &self.telemetry, &self.serving);
        for r in secrets.values() {
            self.snap.set(Kind::Secret, r.clone());
        }
        self.ingress.clear();
        self.ingress_from = None;
        self.published.clear();
        self.by_name.clear();
        self.egress.clear();
        for (key, e) in entries {
            self.set(key, Some(e));
        }
        self.send();
    }
}
