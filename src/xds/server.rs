//! The tonic ADS service: one task per Envoy stream, SotW or delta, that
//! feeds a `Session` with Envoy's requests and the registrar's snapshots and
//! sends out whatever the session says is due. The mesh's access-log
//! service (`access_log`) is served on the same socket.
//!
//! Who counts as an Envoy: a stream only once its first request has come
//! with the right node id, and only while it keeps up. A stream that lags
//! behind the snapshot (see `Session::lagging`) without an ACK or NACK for
//! [`ANSWER_DEADLINE`] stops counting towards readiness until it catches
//! up, so a silent, hung or half-speaking peer cannot hold up hand-overs. HTTP/2 keepalive drops half-open connections,
//! and at most [`MAX_CONNECTIONS`] connections are served at once.

use super::resource::Resource;
use super::session::{Feedback, Flavor, Incoming, Outgoing, Session};
use super::snapshot::{Kind, Snapshot};
use crate::addr::{Addr, ListenError};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

/// How long a stream may leave a response unanswered and still count.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; Envoys are few, so this only stops a flood.
pub const MAX_CONNECTIONS: usize = 64;
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server tells its owner (the registrar) about the Envoys it
/// serves. The server knows nothing else of the registrar: it reads
/// snapshots from a watch channel and reports through this.
pub trait Control: Send + Sync + 'static {
    /// A stream named the right node and asked for something: it is an
    /// Envoy from now on, known to the other calls by the stream's number.
    fn connected(&self, stream: u64, flavor: Flavor);
    /// An ACK or NACK, or what a first request says Envoy holds.
    fn feedback(&self, envoy: u64, fb: Feedback);
    /// The Envoy stopped answering in time, or caught up again.
    fn stalled(&self, envoy: u64, stalled: bool);
    /// Its stream ended.
    fn gone(&self, envoy: u64);
    /// A response of `kind` went out.
    fn pushed(&self, _kind: Kind) {}
    /// Envoy answered a response of `kind`.
    fn answered(&self, _kind: Kind, _nack: bool) {}
    /// The mesh ingress logged a call (`access_log`).
    fn mesh(&self, _event: super::access_log::MeshEvent) {}
}

/// A bound xDS listener, ready to serve once the registrar has recovered.
pub enum XdsListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl XdsListener {
    pub async fn bind(addr: &Addr) -> Result<XdsListener, ListenError> {
        const WHAT: &str = "xDS";
        match addr {
            Addr::Tcp(sa) => {
                if !sa.ip().is_loopback() {
                    tracing::warn!(
                        "serving xDS on {sa}, which is not loopback: anyone who can reach it can pose as an Envoy; prefer the default Unix socket"
                    );
                }
                tokio::net::TcpListener::bind(sa)
                    .await
                    .map(XdsListener::Tcp)
                    .map_err(ListenError::io(WHAT, sa))
            }
            Addr::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse {
                        what: WHAT,
                        at: path.display().to_string(),
                    });
                }
                if let Some(dir) = path.parent().filter(|d| !d.exists()) {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o750)
                        .create(dir)
                        .map_err(ListenError::io(WHAT, dir.display()))?;
                }
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path)
                    .map_err(ListenError::io(WHAT, path.display()))?;
                // Only root (Envoy runs as root) may talk xDS.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(ListenError::io(WHAT, path.display()))?;
                Ok(XdsListener::Unix(l, path.clone()))
            }
        }
    }

    /// Serves ADS until `shutdown` resolves; then every stream ends, the
    /// listener closes (and its socket file goes), and this returns.
    pub async fn serve(
        self,
        control: Arc<dyn Control>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        node_id: String,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        // Tells every stream to end: Envoy's ADS streams never end by
        // themselves, and a graceful shutdown waits for them.
        let (closing_tx, closing) = watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = closing_tx.send(true);
        };
        let sink = control.clone();
        let als = AccessLogServiceServer::new(super::access_log::Als {
            sink: Arc::new(move |e| sink.mesh(e)),
            closing: closing.clone(),
        });
        let ads = AggregatedDiscoveryServiceServer::new(Ads {
            control,
            snapshots,
            node_id,
            closing,
        });
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_EVERY))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(ads)
            .add_service(als);
        let result = match self {
            XdsListener::Tcp(l) => {
                let l = Arc::new(l);
                let incoming = capped(move || {
                    let l = l.clone();
                    async move {
                        let (s, _) = l.accept().await?;
                        // Responses are written in pieces; without this,
                        // Nagle holds the last one until Envoy's delayed
                        // ACK (about 40 ms on Linux).
                        s.set_nodelay(true)?;
                        Ok(s)
                    }
                });
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            XdsListener::Unix(l, path) => {
                let l = Arc::new(l);
                let incoming = capped(move || {
                    let l = l.clone();
                    async move { l.accept().await.map(|(s, _)| s) }
                });
                let r = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                let _ = std::fs::remove_file(path);
                r
            }
        };
        result
    }
}

struct Ads {
    control: Arc<dyn Control>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node_id: String,
    /// Set when the server shuts down (or dropped with it).
    closing: watch::Receiver<bool>,
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
    control: Arc<dyn Control>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node_id: String,
    closing: watch::Receiver<bool>,
}

impl Ads {
    fn context(&self) -> Context {
        Context {
            control: self.control.clone(),
            snapshots: self.snapshots.clone(),
            node_id: self.node_id.clone(),
            closing: self.closing.clone(),
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
    static STREAMS: AtomicU64 = AtomicU64::new(0);
    let stream = STREAMS.fetch_add(1, Ordering::Relaxed) + 1;
    let mut session = Session::new(flavor, ctx.snapshots.borrow_and_update().clone());
    // Set once the first request has named the right node: only then does
    // the stream count as an Envoy.
    let mut envoy: Option<u64> = None;
    let mut stalled = false;
    // Armed while the counted stream lags; pushed back by every answer.
    let mut lagging = false;
    let deadline = tokio::time::sleep(ANSWER_DEADLINE);
    tokio::pin!(deadline);
    let mut closing = ctx.closing.clone();
    tracing::info!("Envoy stream {stream} opened ({flavor:?})");
    'stream: loop {
        tokio::select! {
            msg = inbound.message() => {
                let req = match msg {
                    Ok(Some(req)) => decode(req),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("Envoy stream {stream}: {e}");
                        break;
                    }
                };
                let id = match envoy {
                    Some(id) => id,
                    None => {
                        let given = req.node_id.clone().unwrap_or_default();
                        if given != ctx.node_id {
                            let msg = format!(
                                "node id {given:?} is not served here; this registrar serves {:?}",
                                ctx.node_id
                            );
                            tracing::warn!("refusing Envoy stream {stream}: {msg}");
                            let _ = tx.send(Err(Status::permission_denied(msg))).await;
                            break;
                        }
                        ctx.control.connected(stream, flavor);
                        envoy = Some(stream);
                        stream
                    }
                };
                let Some(kind) = Kind::from_type_url(&req.type_url) else {
                    tracing::debug!("Envoy stream {stream} asked for {}; not served", req.type_url);
                    continue;
                };
                let answers = !req.incoming.nonce.is_empty();
                if answers {
                    deadline.as_mut().reset(tokio::time::Instant::now() + ANSWER_DEADLINE);
                }
                if let Some(fb) = session.on_request(kind, req.incoming) {
                    if answers {
                        ctx.control.answered(kind, fb.error.is_some());
                        match &fb.error {
                            Some(e) => tracing::warn!("Envoy stream {stream} rejected {}: {e}", kind.short()),
                            None => tracing::debug!("Envoy stream {stream} acked {}", kind.short()),
                        }
                    }
                    ctx.control.feedback(id, fb);
                }
            }
            _ = async { let _ = closing.wait_for(|c| *c).await; } => break,
            changed = ctx.snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                session.set_snapshot(ctx.snapshots.borrow_and_update().clone());
            }
            _ = &mut deadline, if lagging && !stalled => {
                stalled = true;
                tracing::warn!(
                    "Envoy stream {stream} has not caught up or answered for {ANSWER_DEADLINE:?}; it no longer counts towards readiness"
                );
                if let Some(id) = envoy {
                    ctx.control.stalled(id, true);
                }
            }
        }
        for out in session.poll() {
            tracing::debug!(
                "Envoy stream {stream}: {} version {} ({} resources, {} removed)",
                out.kind.short(),
                out.version,
                out.resources.len(),
                out.removed.len()
            );
            ctx.control.pushed(out.kind);
            if tx.send(Ok(encode(out))).await.is_err() {
                break 'stream;
            }
        }
        let now_lagging = envoy.is_some() && session.lagging();
        if now_lagging && !lagging {
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + ANSWER_DEADLINE);
        }
        lagging = now_lagging;
        if stalled && !lagging {
            stalled = false;
            tracing::info!("Envoy stream {stream} has caught up");
            if let Some(id) = envoy {
                ctx.control.stalled(id, false);
            }
        }
    }
    tracing::info!("Envoy stream {stream} closed");
    if let Some(id) = envoy {
        ctx.control.gone(id);
    }
}

/// Accepted connections, at most [`MAX_CONNECTIONS`] open at once (fewer
/// under a low open-file limit; see `fdlimit`). Accept
/// errors (out of descriptors, say) back off instead of spinning.
fn capped<S, F, Fut>(mut accept: F) -> ReceiverStream<std::io::Result<Capped<S>>>
where
    S: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<S>> + Send,
{
    let (tx, rx) = mpsc::channel(1);
    let permits = Arc::new(Semaphore::new(crate::fdlimit::cap(MAX_CONNECTIONS)));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            // The server dropped the stream (it shut down): stop, and let
            // go of the listener now, not after one more connection.
            let accepted = tokio::select! {
                a = accept() => a,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok(io) => {
                    let c = Capped {
                        io,
                        _permit: permit,
                    };
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("accepting an xDS connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A connection that holds one of the server's permits while open.
pub struct Capped<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: Connected> Connected for Capped<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
