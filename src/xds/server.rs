//! The tonic ADS service: one task per Envoy stream, SotW or delta, that
//! feeds a `Session` with Envoy's requests and the registrar's snapshots and
//! sends out whatever the session says is due.

use super::resources::Resource;
use super::session::{Flavor, Incoming, Outgoing, Session};
use super::snapshot::{Kind, Snapshot};
use crate::addr::Addr;
use crate::registrar::metrics::METRICS;
use crate::registrar::state::Shared;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// A bound xDS listener, ready to serve once the registrar has recovered.
pub enum XdsListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl XdsListener {
    pub async fn bind(addr: &Addr) -> Result<XdsListener, String> {
        match addr {
            Addr::Tcp(sa) => tokio::net::TcpListener::bind(sa)
                .await
                .map(XdsListener::Tcp)
                .map_err(|e| format!("cannot listen for xDS on {sa}: {e}")),
            Addr::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(format!("{} is already being served", path.display()));
                }
                let _ = std::fs::remove_file(path);
                tokio::net::UnixListener::bind(path)
                    .map(|l| XdsListener::Unix(l, path.clone()))
                    .map_err(|e| format!("cannot listen for xDS on {}: {e}", path.display()))
            }
        }
    }

    /// Serves ADS until `shutdown` resolves.
    pub async fn serve(
        self,
        registry: Shared,
        node_id: String,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), String> {
        let snapshots = registry.lock().expect("registry").snapshots();
        let ads = AggregatedDiscoveryServiceServer::new(Ads {
            registry,
            snapshots,
            node_id,
        });
        let router = tonic::transport::Server::builder().add_service(ads);
        let result = match self {
            XdsListener::Tcp(l) => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                    .await
            }
            XdsListener::Unix(l, path) => {
                let r = router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                    .await;
                let _ = std::fs::remove_file(path);
                r
            }
        };
        result.map_err(|e| format!("xDS server: {e}"))
    }
}

struct Ads {
    registry: Shared,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node_id: String,
}

type Outbox<T> = mpsc::Sender<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(pump(
            Flavor::Sotw,
            request.into_inner(),
            tx,
            self.context(),
            decode_sotw,
            encode_sotw,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(pump(
            Flavor::Delta,
            request.into_inner(),
            tx,
            self.context(),
            decode_delta,
            encode_delta,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Context {
    registry: Shared,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node_id: String,
}

impl Ads {
    fn context(&self) -> Context {
        Context {
            registry: self.registry.clone(),
            snapshots: self.snapshots.clone(),
            node_id: self.node_id.clone(),
        }
    }
}

/// A request in the form the session takes.
struct Decoded {
    type_url: String,
    node_id: Option<String>,
    incoming: Incoming,
}

fn decode_sotw(r: DiscoveryRequest) -> Decoded {
    Decoded {
        type_url: r.type_url,
        node_id: r.node.map(|n| n.id),
        incoming: Incoming {
            nonce: r.response_nonce,
            error: r.error_detail.map(|s| s.message),
            version_info: r.version_info,
            names: r.resource_names,
            ..Default::default()
        },
    }
}

fn decode_delta(r: DeltaDiscoveryRequest) -> Decoded {
    Decoded {
        type_url: r.type_url,
        node_id: r.node.map(|n| n.id),
        incoming: Incoming {
            nonce: r.response_nonce,
            error: r.error_detail.map(|s| s.message),
            subscribe: r.resource_names_subscribe,
            unsubscribe: r.resource_names_unsubscribe,
            initial_versions: r.initial_resource_versions.into_iter().collect(),
            ..Default::default()
        },
    }
}

fn encode_sotw(o: Outgoing) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: o.version,
        resources: o.resources.iter().map(|r| r.any.clone()).collect(),
        type_url: o.kind.type_url().into(),
        nonce: o.nonce,
        ..Default::default()
    }
}

fn encode_delta(o: Outgoing) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: o.version,
        resources: o.resources.iter().map(|r| delta_resource(r)).collect(),
        type_url: o.kind.type_url().into(),
        removed_resources: o.removed,
        nonce: o.nonce,
        ..Default::default()
    }
}

fn delta_resource(r: &Resource) -> DeltaResource {
    DeltaResource {
        name: r.name.clone(),
        version: r.version.clone(),
        resource: Some(r.any.clone()),
        ..Default::default()
    }
}

/// Runs one Envoy stream to its end.
async fn pump<Req, Resp>(
    flavor: Flavor,
    mut inbound: Streaming<Req>,
    tx: Outbox<Resp>,
    mut ctx: Context,
    decode: fn(Req) -> Decoded,
    encode: fn(Outgoing) -> Resp,
) {
    let id = ctx.registry.lock().expect("registry").envoy_connected();
    let mut session = Session::new(flavor, ctx.snapshots.borrow_and_update().clone());
    let mut node: Option<String> = None;
    tracing::info!("Envoy stream {id} opened ({flavor:?})");
    'stream: loop {
        tokio::select! {
            msg = inbound.message() => {
                let req = match msg {
                    Ok(Some(req)) => decode(req),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("Envoy stream {id}: {e}");
                        break;
                    }
                };
                if node.is_none() {
                    let given = req.node_id.clone().unwrap_or_default();
                    if given != ctx.node_id {
                        let msg = format!(
                            "node id {given:?} is not served here; this registrar serves {:?}",
                            ctx.node_id
                        );
                        tracing::warn!("refusing Envoy stream {id}: {msg}");
                        let _ = tx.send(Err(Status::permission_denied(msg))).await;
                        break;
                    }
                    node = Some(given);
                }
                let Some(kind) = Kind::from_type_url(&req.type_url) else {
                    tracing::debug!("Envoy stream {id} asked for {}; not served", req.type_url);
                    continue;
                };
                let answers = !req.incoming.nonce.is_empty();
                if let Some(fb) = session.on_request(kind, req.incoming) {
                    if answers {
                        METRICS.answered(kind, fb.error.is_some());
                        match &fb.error {
                            Some(e) => tracing::warn!("Envoy stream {id} rejected {}: {e}", kind.short()),
                            None => tracing::debug!("Envoy stream {id} acked {}", kind.short()),
                        }
                    }
                    ctx.registry.lock().expect("registry").envoy_feedback(id, fb);
                }
            }
            changed = ctx.snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                session.set_snapshot(ctx.snapshots.borrow_and_update().clone());
            }
        }
        for out in session.poll() {
            tracing::debug!(
                "Envoy stream {id}: {} version {} ({} resources, {} removed)",
                out.kind.short(),
                out.version,
                out.resources.len(),
                out.removed.len()
            );
            METRICS.pushed(out.kind);
            if tx.send(Ok(encode(out))).await.is_err() {
                break 'stream;
            }
        }
    }
    tracing::info!("Envoy stream {id} closed");
    ctx.registry.lock().expect("registry").envoy_gone(id);
}
