//! `serve --admin ADDR`: the registrar's own HTTP endpoint.
//! - `GET /healthz`: 200 with a JSON body once xDS is being served, else 503;
//!   it also says whether published ports are claimed in nftables;
//! - `GET /mappings`: the same JSON as `envoy-docker status --json`;
//! - `GET /metrics`: Prometheus text about the registrar itself;
//! - `GET /` and `/api/v1/`: the dashboard and its JSON (see `dashboard`).
//!
//! Read only: any other method gets 405. On a non-loopback address every
//! path but `/healthz` needs the token (`dashboard::auth`). Every answer
//! says `nosniff` and carries a Content-Security-Policy that lets a page
//! load only its own script and style, and none carries CORS headers.

use super::dashboard::auth::{local_host, Token};
use super::dashboard::Dashboard;
use super::keeper::{Read, Registrar};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;

pub async fn bind(
    addr: &crate::addr::Addr,
) -> Result<tokio::net::TcpListener, crate::addr::ListenError> {
    const WHAT: &str = "the admin endpoint";
    match addr {
        crate::addr::Addr::Tcp(sa) => tokio::net::TcpListener::bind(sa)
            .await
            .map_err(crate::addr::ListenError::io(WHAT, sa)),
        crate::addr::Addr::Unix(p) => Err(crate::addr::ListenError::Kind {
            what: WHAT,
            at: p.display().to_string(),
            want: "HOST:PORT",
        }),
    }
}

/// Connections served at once: scrapers and health checks are few.
pub const MAX_CONNECTIONS: usize = 64;
/// How long an admin connection may stay open, idle or not.
const CONNECTION_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the answer in flight at the budget may still take.
const LAST_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until the caller drops this future, which ends every
/// connection with it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registrar: Registrar,
    dashboard: Arc<Dashboard>,
    token: Token,
) {
    let token = Arc::new(token);
    let permits = Arc::new(tokio::sync::Semaphore::new(crate::fdlimit::cap(
        MAX_CONNECTIONS,
    )));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // Wait for a free slot before accepting: a flood of idle
        // connections then queues in the kernel instead of eating
        // descriptors.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!("accepting an admin connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registrar = registrar.clone();
        let dashboard = dashboard.clone();
        let token = token.clone();
        connections.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let registrar = registrar.clone();
                let dashboard = dashboard.clone();
                let token = token.clone();
                async move {
                    let mut r = guarded(&req, &registrar, &dashboard, &token).await;
                    secure(&mut r);
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            // At the budget the connection ends after the answer in
            // flight, not in the middle of it (a dashboard keeps its
            // connection alive across polls).
            if tokio::time::timeout(CONNECTION_BUDGET, conn.as_mut())
                .await
                .is_err()
            {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(LAST_ANSWER, conn).await;
            }
        });
    }
}

fn reply(status: StatusCode, kind: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = kind.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// What the dashboard's page may do: its own script, style and API only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The headers every answer carries.
fn secure(r: &mut Response<Full<Bytes>>) {
    use hyper::header::{HeaderValue, CACHE_CONTROL, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS};
    let h = r.headers_mut();
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The token check, then the route.
async fn guarded(
    req: &Request<hyper::body::Incoming>,
    registrar: &Registrar,
    dashboard: &Dashboard,
    token: &Token,
) -> Response<Full<Bytes>> {
    let open = req.uri().path() == "/healthz";
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !open
        && !token.required()
        && !local_host(req.headers().get(hyper::header::HOST).map(|v| v.as_bytes()))
    {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "this admin address serves loopback names only (127.0.0.1, [::1], localhost); \
             a page of another site may not read it\n"
                .into(),
        );
    }
    if !open && !token.admits(auth) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "this registrar's admin needs its token (--admin-token-file): \
             send it as a bearer token, or as the password of HTTP Basic\n"
                .into(),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static(
                r#"Basic realm="envoy-docker", charset="UTF-8""#,
            ),
        );
        return r;
    }
    if req.method() == hyper::Method::GET {
        if let Some((status, kind, body)) = dashboard.answer(req.uri().path()).await {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(kind),
            );
            return r;
        }
    }
    route(req, registrar).await
}

async fn route(
    req: &Request<hyper::body::Incoming>,
    registrar: &Registrar,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let gone = || {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the registrar is shutting down\n".into(),
        )
    };
    match req.uri().path() {
        "/healthz" => {
            let Some(view) = registrar.ask(Read::Overview).await else {
                return gone();
            };
            let serving = view.serving;
            let stalled = view
                .envoys
                .iter()
                .filter(|e| e.stalled_secs.is_some())
                .count();
            let mut body = serde_json::json!({
                "status": if serving { "serving" } else { "starting" },
                "envoys_connected": view.envoys.len(),
                "envoys_stalled": stalled,
                "mappings": view.mappings,
            });
            // Reported, not judged: unclaimed ports still answer, through
            // Docker's DNAT where its iptables is on.
            let ports = view.ports;
            body["ports"] = serde_json::json!({
                "claimed": ports.claimed(),
                "state": ports,
                "detail": ports.describe(),
            });
            // etcd's state is reported, not judged: local ports work without it.
            if let Some((host_id, etcd, catalog)) = view.fleet {
                body["fleet"] = serde_json::json!({
                    "host_id": host_id,
                    "etcd": super::fleet::describe(&etcd),
                    "instances": catalog.len(),
                });
            }
            let code = if serving {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(code, "application/json", format!("{body}\n"))
        }
        "/mappings" => {
            let Some(list) = registrar.ask(Read::List).await else {
                return gone();
            };
            let rows: Vec<crate::mapping::Row> = list.iter().map(Into::into).collect();
            match serde_json::to_string_pretty(&rows) {
                Ok(s) => reply(StatusCode::OK, "application/json", s + "\n"),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/metrics" => {
            let (Some(list), Some(view)) = (
                registrar.ask(Read::List).await,
                registrar.ask(Read::Overview).await,
            ) else {
                return gone();
            };
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                super::metrics::render(registrar.metrics(), &list, view.envoys.len())
                    + &super::metrics::render_ports(&view.ports)
                    + &view
                        .fleet
                        .map(|(_, etcd, catalog)| super::metrics::render_fleet(&etcd, &catalog))
                        .unwrap_or_default()
                    + &super::metrics::render_mesh(&view.mesh, &registrar.metrics().mesh_calls()),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /, /api/v1/overview, /healthz, /mappings or /metrics\n".into(),
        ),
    }
}
