//! The ADS server against an in-process gRPC client, without root or
//! Envoy: who counts as an Envoy (the node check), what ACKs and NACKs
//! report, a stream that stops answering (the stall), and shutdown.
//!
//! The owner is a recording `Control`: the server's only view of the
//! registrar, so the test sees exactly what the registrar would.

use super::*;
use crate::mapping::{Backend, MappingKey, Mode, Proto};
use crate::xds::resource::Service;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Connected(u64),
    Feedback(u64, Kind, Option<String>),
    Stalled(u64, bool),
    Gone(u64),
}

struct Recorder(mpsc::UnboundedSender<Seen>);

impl Control for Recorder {
    fn connected(&self, stream: u64, _: crate::xds::session::Flavor) {
        let _ = self.0.send(Seen::Connected(stream));
    }
    fn feedback(&self, envoy: u64, fb: Feedback) {
        let _ = self.0.send(Seen::Feedback(envoy, fb.kind, fb.error));
    }
    fn stalled(&self, envoy: u64, stalled: bool) {
        let _ = self.0.send(Seen::Stalled(envoy, stalled));
    }
    fn gone(&self, envoy: u64) {
        let _ = self.0.send(Seen::Gone(envoy));
    }
}

fn snapshot(ports: &[u16]) -> Arc<Snapshot> {
    let services: Vec<Service> = ports
        .iter()
        .map(|p| Service {
            key: MappingKey {
                proto: Proto::Tcp,
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: *p,
            },
            backend: Backend {
                container_ip: "10.0.0.2".parse().unwrap(),
                container_port: 80,
            },
            mode: Mode::Tcp,
            name: format!("svc{p}"),
            service: format!("svc{p}"),
            environment: None,
            container: None,
            proxy_protocol: None,
            image: None,
        })
        .collect();
    Arc::new(Snapshot::build(
        &services,
        &Default::default(),
        &Default::default(),
    ))
}

/// A server on a loopback port with a recorder; what it records, the
/// snapshot sender, and the trigger that shuts it down.
struct Running {
    addr: std::net::SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start() -> Running {
    let listener = XdsListener::bind(&Addr::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let XdsListener::Tcp(l) = &listener else {
        unreachable!()
    };
    let addr = l.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let (snapshots, rx) = watch::channel(snapshot(&[8080]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served =
        tokio::spawn(
            listener.serve(Arc::new(Recorder(tx)), rx, "node-a".into(), async move {
                let _ = stopped.await;
            }),
        );
    Running {
        addr,
        seen,
        snapshots,
        stop: Some(stop),
        served,
    }
}

const WAIT: Duration = Duration::from_secs(10);

impl Running {
    /// The next event, within `WAIT`.
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("no event in 10 s")
            .expect("the server dropped its control")
    }

    /// Events until one matches `want`; the ones before it.
    async fn until(&mut self, want: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        let mut before = Vec::new();
        loop {
            let s = self.next().await;
            if want(&s) {
                return before;
            }
            before.push(s);
        }
    }
}

/// An open SotW stream: requests go in on `tx`.
struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

async fn open(addr: std::net::SocketAddr) -> Result<Stream, Status> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, requests) = mpsc::channel(8);
    let rx = client
        .stream_aggregated_resources(ReceiverStream::new(requests))
        .await?
        .into_inner();
    Ok(Stream { tx, rx })
}

fn request(node: &str, kind: Kind, answering: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: kind.type_url().into(),
        version_info: answering
            .map(|r| r.version_info.clone())
            .unwrap_or_default(),
        response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

impl Stream {
    async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    async fn recv(&mut self) -> Result<Option<DiscoveryResponse>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in 10 s")
    }
}

#[tokio::test]
async fn a_stream_with_another_node_id_is_refused_and_never_counts() {
    let mut s = start().await;
    let mut stream = open(s.addr).await.unwrap();
    stream.send(request("node-b", Kind::Cluster, None)).await;
    let refused = stream.recv().await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("node-a"), "{refused:?}");
    // A stream with the right name counts; the refused one never did.
    let good = open(s.addr).await.unwrap();
    good.send(request("node-a", Kind::Cluster, None)).await;
    let before = s.until(|e| matches!(e, Seen::Connected(_))).await;
    assert!(before.is_empty(), "{before:?}");
}

#[tokio::test]
async fn acks_nacks_and_a_stall_reach_the_owner() {
    let mut s = start().await;
    let mut stream = open(s.addr).await.unwrap();
    stream.send(request("node-a", Kind::Cluster, None)).await;
    let Seen::Connected(id) = s.next().await else {
        panic!("the first event is not the connection")
    };
    let first = stream.recv().await.unwrap().unwrap();
    assert_eq!(first.type_url, Kind::Cluster.type_url());
    assert_eq!(first.resources.len(), 1);

    // A NACK reaches the owner with Envoy's words.
    let mut nack = request("node-a", Kind::Cluster, Some(&first));
    nack.version_info = String::new();
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad cluster".into(),
        ..Default::default()
    });
    stream.send(nack).await;
    s.until(|e| *e == Seen::Feedback(id, Kind::Cluster, Some("bad cluster".into())))
        .await;

    // A new snapshot goes out; left unanswered past the deadline, the
    // stream stops counting, and an ACK brings it back.
    s.snapshots.send(snapshot(&[8080, 8081])).unwrap();
    let second = stream.recv().await.unwrap().unwrap();
    assert_eq!(second.resources.len(), 2);
    let stalled_at = tokio::time::Instant::now();
    s.until(|e| *e == Seen::Stalled(id, true)).await;
    assert!(stalled_at.elapsed() >= ANSWER_DEADLINE - Duration::from_millis(100));
    stream
        .send(request("node-a", Kind::Cluster, Some(&second)))
        .await;
    // Caught up means holding the listeners, which go out once their
    // clusters' endpoints are held: ask for those by name, as Envoy does,
    // and ACK whatever comes until the owner hears the stream caught up.
    let clusters: Vec<String> = second
        .resources
        .iter()
        .map(|any| {
            use prost::Message;
            envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(any.value.as_slice())
                .unwrap()
                .name
        })
        .collect();
    let mut eds = request("node-a", Kind::Endpoint, None);
    eds.resource_names = clusters.clone();
    stream.send(eds).await;
    stream.send(request("node-a", Kind::Listener, None)).await;
    let mut before = Vec::new();
    let mut caught_up = false;
    for _ in 0..8 {
        let r = stream.recv().await.unwrap().unwrap();
        let kind = Kind::from_type_url(&r.type_url).unwrap();
        let mut ack = request("node-a", kind, Some(&r));
        if kind == Kind::Endpoint {
            ack.resource_names = clusters.clone();
        }
        stream.send(ack).await;
        if kind == Kind::Listener && !r.resources.is_empty() {
            before = s.until(|e| *e == Seen::Stalled(id, false)).await;
            caught_up = true;
            break;
        }
    }
    assert!(caught_up, "the listeners never came");
    // The ACK of the stalled response reached the owner on the way.
    assert!(
        before.contains(&Seen::Feedback(id, Kind::Cluster, None)),
        "{before:?}"
    );
    // Shutdown ends the stream, reports the Envoy gone, and returns.
    s.stop.take().unwrap().send(()).unwrap();
    s.until(|e| *e == Seen::Gone(id)).await;
    let served = tokio::time::timeout(WAIT, &mut s.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    assert!(matches!(stream.rx.message().await, Ok(None) | Err(_)));
}
