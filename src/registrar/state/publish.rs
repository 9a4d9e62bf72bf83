//! Publishing into the xDS cache: each mapping's cluster, assignment and
//! listener go into the snapshot being edited, one mapping at a time, and a
//! clone (O(1)) goes to every Envoy stream on a watch channel. Also which
//! mapping a resource name belongs to, so an ACK re-judges only those.

use super::entry::{service, Entry};
use crate::mapping::{MappingKey, Proto};
use crate::xds::resources;
use crate::xds::serving::Serving;
use crate::xds::snapshot::{Kind, Snapshot};
use crate::xds::telemetry::Telemetry;
use std::collections::BTreeMap;
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
        self.snap = Snapshot::build(std::iter::empty(), &self.telemetry, &self.serving);
        self.published.clear();
        self.by_name.clear();
        for (key, e) in entries {
            self.set(key, Some(e));
        }
        self.send();
    }
}
