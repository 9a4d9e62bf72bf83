//! Reads Envoy's admin endpoint (`--envoy-admin`): one `GET` per
//! connection, bounded in time and size. The dashboard's only way to see
//! Envoy's stats and what Envoy holds.

use crate::addr::Addr;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Bound on one request, connecting included.
const BUDGET: Duration = Duration::from_secs(3);
/// Bound on one answer: the stats of 10,000 mappings fit well within it.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Envoy's admin at {at}: {source}")]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Envoy's admin at {at}: {source}")]
    Http {
        at: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Envoy's admin at {at} answered {status} to {path}")]
    Status {
        at: String,
        path: String,
        status: u16,
    },
    #[error("Envoy's admin at {at} did not answer {path} within {BUDGET:?}")]
    Timeout { at: String, path: String },
    #[error("Envoy's admin at {at}: the answer to {path} is over {MAX_BODY} bytes")]
    TooLarge { at: String, path: String },
}

/// `GET path` from Envoy's admin at `addr`; the body as text.
pub async fn get(addr: &Addr, path: &str) -> Result<String, AdminError> {
    let at = addr.to_string();
    match tokio::time::timeout(BUDGET, fetch(addr, path, &at)).await {
        Ok(r) => r,
        Err(_) => Err(AdminError::Timeout {
            at,
            path: path.into(),
        }),
    }
}

async fn fetch(addr: &Addr, path: &str, at: &str) -> Result<String, AdminError> {
    let connect = |source| AdminError::Connect {
        at: at.into(),
        source,
    };
    let http = |source| AdminError::Http {
        at: at.into(),
        source,
    };
    let mut sender = match addr {
        Addr::Tcp(a) => handshake(tokio::net::TcpStream::connect(a).await.map_err(connect)?)
            .await
            .map_err(http)?,
        Addr::Unix(p) => handshake(tokio::net::UnixStream::connect(p).await.map_err(connect)?)
            .await
            .map_err(http)?,
    };
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "envoy")
        .body(Empty::<Bytes>::new())
        .map_err(|_| AdminError::Status {
            at: at.into(),
            path: path.into(),
            status: 0,
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if !resp.status().is_success() {
        return Err(AdminError::Status {
            at: at.into(),
            path: path.into(),
            status: resp.status().as_u16(),
        });
    }
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(http)?.into_data() {
            out.extend_from_slice(&data);
            if out.len() > MAX_BODY {
                return Err(AdminError::TooLarge {
                    at: at.into(),
                    path: path.into(),
                });
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
