//! The one task that owns the registry. Every input of the registrar (proxy
//! connections and their requests, Docker, the xDS server's reports, the
//! etcd catalog, the nftables claims, timers) arrives here as an [`Input`]
//! on one channel; the task applies it to the `Registry`, whose decisions
//! are plain functions of its state (see `state`), and then carries out
//! what the registry asks for (`state::Outputs`): orders written to the
//! proxies' connections, connections closed, owner processes watched.
//! Readers (`status`, `/mappings`, `/healthz`, `/metrics`) ask through the
//! same channel and get their answer on a oneshot.
//!
//! There is no lock: the registry is only ever touched by this task, and
//! the task ends when the registrar stops, taking its owner watches along.

use super::liveness::{self, OwnerProcess};
use super::metrics::Metrics;
use super::state::fleet::{EtcdReport, EtcdState, Instances};
use super::state::journal::Event;
use super::state::{Arrival, DashRow, Detail, DockerReach, Refusal, Registry};
use crate::catalog::EgressService;
use crate::mapping::{EnvoyStatus, MappingKey, MappingStatus, Server};
use crate::nft::ruleset::Claims;
use crate::nft::PortsState;
use crate::protocol::Reply;
use crate::xds::session::Feedback;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Where a proxy connection's orders go.
pub type Outbox = mpsc::UnboundedSender<Reply>;

/// One thing that happened, for the registry to take in.
pub enum Input {
    /// A proxy connection passed its hello; its orders go to the outbox.
    LinkOpened(u64, Outbox),
    /// A proxy connection closed: its mappings go with it.
    ConnectionClosed(u64),
    /// A mapping to add; the registry's answer goes back on the oneshot.
    Register(Arrival, oneshot::Sender<Result<(), Refusal>>),
    /// A proxy says who serves its mapping now.
    Serving {
        conn: u64,
        key: MappingKey,
        server: Server,
        relayed: u64,
    },
    /// Remove a mapping; `closed` is told once no Envoy holds it.
    Deregister {
        key: MappingKey,
        closed: oneshot::Sender<()>,
    },
    /// The slow /proc check behind the owner watches.
    Reap,
    /// The reconnect grace after start-up is over.
    GraceOver,
    /// Start-up is over: Envoys are served from now on.
    ServingEnvoys,
    /// Docker told us about a container.
    Container(super::docker::meta::ContainerMeta),
    /// A container is gone; its address may be reused.
    ForgetContainer(String),
    /// The xDS server's reports, by stream number.
    EnvoyConnected(u64, crate::xds::session::Flavor),
    EnvoyFeedback(u64, Feedback),
    EnvoyStalled(u64, bool),
    EnvoyGone(u64),
    /// A leaf issued or renewed for one mesh identity.
    MeshLeaf(crate::mesh::ca::Leaf),
    /// A mesh identity no longer needed.
    MeshLeafGone(String),
    /// The fleet's catalog as just read from etcd.
    Catalog(Instances),
    /// Where egress listens.
    EgressIp(Option<std::net::IpAddr>),
    /// How the fleet's last etcd calls went.
    Etcd(EtcdReport),
    /// Whether Docker's API answers, as the watcher says.
    DockerReach(super::state::DockerReach),
    /// What the nftables table claims now (`None`: ports not claimed).
    ClaimsApplied(Option<Claims>),
    /// A question; the answer goes back on its oneshot.
    Read(Read),
}

/// What readers may ask.
pub enum Read {
    List(oneshot::Sender<Vec<MappingStatus>>),
    Envoys(oneshot::Sender<Vec<EnvoyStatus>>),
    Fleet(oneshot::Sender<Option<FleetView>>),
    Ports(oneshot::Sender<PortsState>),
    Overview(oneshot::Sender<Overview>),
    /// The mappings as the dashboard lists them.
    Dashboard(oneshot::Sender<Vec<DashRow>>),
    /// One mapping in full, by its name in Envoy.
    Detail(String, oneshot::Sender<Option<Detail>>),
    /// The last events, newest first.
    Events(oneshot::Sender<Vec<Event>>),
    /// The egress listeners (port, address, service).
    Egress(oneshot::Sender<Vec<(u16, Option<std::net::IpAddr>, EgressService)>>),
}

/// This host in the fleet: its id, etcd's state, and the catalog.
pub type FleetView = (String, EtcdState, Instances);

/// What `/healthz` and `/metrics` need besides the mapping rows.
#[derive(Debug, Clone)]
pub struct Overview {
    /// Start-up is over and Envoys are served.
    pub serving: bool,
    pub envoys: Vec<EnvoyStatus>,
    pub mappings: usize,
    pub ports: PortsState,
    pub fleet: Option<FleetView>,
    pub docker: DockerReach,
    /// Each Envoy's stream and its ADS flavour.
    pub flavors: Vec<(u64, Option<&'static str>)>,
    /// With the mesh: each identity's leaf.
    pub mesh: Vec<(String, super::state::mesh::LeafState)>,
}

/// The handle every part of the registrar holds: it sends inputs to the
/// task and asks it questions. Cheap to clone.
#[derive(Clone)]
pub struct Registrar {
    tx: mpsc::UnboundedSender<Input>,
    metrics: Arc<Metrics>,
}

impl Registrar {
    /// Hands an input to the task. After the task has stopped, inputs are
    /// dropped: the registrar is shutting down.
    pub fn tell(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    /// Asks a question; `None` once the task has stopped.
    pub async fn ask<T>(&self, read: impl FnOnce(oneshot::Sender<T>) -> Read) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tell(Input::Read(read(tx)));
        rx.await.ok()
    }

    /// Registers a mapping and waits for the registry's answer.
    pub async fn register(&self, arrival: Arrival) -> Result<(), Refusal> {
        let (reply, answer) = oneshot::channel();
        self.tell(Input::Register(arrival, reply));
        answer.await.unwrap_or(Err(Refusal::Stopping))
    }

    /// The counters the registry and the xDS server keep (atomics, read
    /// and bumped without the task).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// Makes the handle for `registry`; [`run`] then owns the registry.
pub fn handle(registry: &Registry) -> (Registrar, mpsc::UnboundedReceiver<Input>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let metrics = registry.metrics();
    (Registrar { tx, metrics }, rx)
}

/// Owns `registry` until `stop` is set (or every handle is gone).
pub async fn run(
    mut registry: Registry,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let mut links: BTreeMap<u64, Outbox> = BTreeMap::new();
    // Owner processes being watched; each resolves with the mapping it
    // holds once the process has exited.
    let mut owners: JoinSet<(MappingKey, OwnerProcess)> = JoinSet::new();
    // What the registry asked for before the task took it over (the
    // owners of recovered mappings, to watch).
    carry_out(registry.take_outputs(), &mut links, &mut owners);
    loop {
        tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => apply(&mut registry, &mut links, input),
                None => return,
            },
            Some(Ok((key, owner))) = owners.join_next(), if !owners.is_empty() => {
                registry.owner_exited(&key, owner);
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        carry_out(registry.take_outputs(), &mut links, &mut owners);
    }
}

fn carry_out(
    out: super::state::Outputs,
    links: &mut BTreeMap<u64, Outbox>,
    owners: &mut JoinSet<(MappingKey, OwnerProcess)>,
) {
    for (conn, order) in out.orders {
        if let Some(tx) = links.get(&conn) {
            let _ = tx.send(order);
        }
    }
    // Dropping the outbox closes the connection: its proxy registers again.
    for conn in out.close {
        links.remove(&conn);
    }
    for (key, owner) in out.watch {
        owners.spawn(async move {
            liveness::exited(owner).await;
            (key, owner)
        });
    }
}

fn apply(r: &mut Registry, links: &mut BTreeMap<u64, Outbox>, input: Input) {
    match input {
        Input::LinkOpened(conn, outbox) => {
            links.insert(conn, outbox);
            r.link_opened(conn);
        }
        Input::ConnectionClosed(conn) => {
            links.remove(&conn);
            r.connection_closed(conn);
        }
        Input::Register(arrival, reply) => {
            let _ = reply.send(r.register(arrival));
        }
        Input::Serving {
            conn,
            key,
            server,
            relayed,
        } => r.serving(conn, &key, server, relayed),
        Input::Deregister { key, closed } => r.deregister(&key, closed),
        Input::Reap => r.reap(),
        Input::GraceOver => r.tick(),
        Input::ServingEnvoys => r.set_serving_envoys(),
        Input::Container(meta) => r.apply_container(meta),
        Input::ForgetContainer(id) => r.forget_container(&id),
        Input::EnvoyConnected(stream, flavor) => {
            r.envoy_connected(stream);
            r.set_envoy_flavor(stream, flavor);
        }
        Input::EnvoyFeedback(id, fb) => r.envoy_feedback(id, fb),
        Input::EnvoyStalled(id, stalled) => r.envoy_stalled(id, stalled),
        Input::EnvoyGone(id) => r.envoy_gone(id),
        Input::Catalog(c) => r.set_catalog(c),
        Input::MeshLeaf(leaf) => r.mesh_leaf(leaf),
        Input::MeshLeafGone(id) => r.mesh_leaf_gone(&id),
        Input::EgressIp(ip) => r.set_egress_ip(ip),
        Input::Etcd(error) => r.etcd_report(error),
        Input::ClaimsApplied(c) => r.claims_applied(c),
        Input::DockerReach(d) => r.set_docker_reach(d),
        Input::Read(read) => answer(r, read),
    }
}

fn answer(r: &Registry, read: Read) {
    match read {
        Read::List(tx) => {
            let _ = tx.send(r.list());
        }
        Read::Envoys(tx) => {
            let _ = tx.send(r.envoys());
        }
        Read::Fleet(tx) => {
            let _ = tx.send(r.fleet_view());
        }
        Read::Ports(tx) => {
            let _ = tx.send(r.ports_state());
        }
        Read::Overview(tx) => {
            let _ = tx.send(Overview {
                mesh: r.mesh_view(),
                serving: r.serving_envoys(),
                envoys: r.envoys(),
                mappings: r.len(),
                ports: r.ports_state(),
                fleet: r.fleet_view(),
                docker: r.docker_reach(),
                flavors: r.envoy_flavors(),
            });
        }
        Read::Dashboard(tx) => {
            let _ = tx.send(r.dash_rows());
        }
        Read::Detail(id, tx) => {
            let _ = tx.send(r.detail(&id));
        }
        Read::Events(tx) => {
            let _ = tx.send(r.events());
        }
        Read::Egress(tx) => {
            let _ = tx.send(r.egress_view());
        }
    }
}
