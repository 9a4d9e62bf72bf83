//! A small Docker Engine API client: JSON GETs and the `/events` stream,
//! over the daemon's Unix socket or TCP, with hyper's HTTP/1.1 client
//! (hyper is already in the tree for gRPC, and it handles chunked bodies
//! and framing that a hand-written client would get wrong).

use super::api;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest JSON answer accepted from Docker.
const MAX_BODY: usize = 32 << 20;

/// What went wrong talking to Docker, by kind.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("bad Docker address {0:?}: want unix:///PATH, tcp://HOST:PORT or none")]
    BadAddress(String),
    #[error("cannot connect to Docker: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP to Docker failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("GET {path}: {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("GET {path}: not an answer Docker's API gives: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("an answer from Docker over {MAX_BODY} bytes")]
    TooLarge,
    #[error("{0} timed out")]
    Timeout(String),
    #[error("an event line from Docker is too long; skipped")]
    LongLine,
    #[error("bad event from Docker: {0}")]
    BadEvent(#[source] serde_json::Error),
    #[error("Docker's answer lacks {0}")]
    Missing(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Debug, Clone)]
pub struct Docker {
    pub endpoint: Endpoint,
    /// "/v1.47", once the daemon has said what it speaks.
    prefix: std::sync::Arc<tokio::sync::OnceCell<String>>,
}

impl Docker {
    /// `--docker URL|none`, else `$DOCKER_HOST`, else the default socket.
    pub fn from_setting(flag: Option<&str>) -> Result<Option<Docker>, DockerError> {
        let env = std::env::var("DOCKER_HOST").ok().filter(|v| !v.is_empty());
        let url = flag
            .map(str::to_string)
            .or(env)
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        if url == "none" {
            return Ok(None);
        }
        let endpoint = if let Some(path) = url.strip_prefix("unix://") {
            Endpoint::Unix(PathBuf::from(path))
        } else if let Some(addr) = url.strip_prefix("tcp://") {
            Endpoint::Tcp(addr.trim_end_matches('/').to_string())
        } else {
            return Err(DockerError::BadAddress(url));
        };
        Ok(Some(Docker {
            endpoint,
            prefix: Default::default(),
        }))
    }

    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("unix://{}", p.display()),
            Endpoint::Tcp(a) => format!("tcp://{a}"),
        }
    }

    async fn sender(&self) -> Result<SendRequest<Empty<Bytes>>, DockerError> {
        match &self.endpoint {
            Endpoint::Unix(p) => {
                handshake(
                    tokio::net::UnixStream::connect(p)
                        .await
                        .map_err(DockerError::Connect)?,
                )
                .await
            }
            Endpoint::Tcp(a) => {
                handshake(
                    tokio::net::TcpStream::connect(a)
                        .await
                        .map_err(DockerError::Connect)?,
                )
                .await
            }
        }
    }

    /// The one HTTP/1 request this client makes: `GET path` (already
    /// versioned or not), on a connection of its own; the answer's head,
    /// or an error for any status but success.
    async fn request(&self, path: &str) -> Result<hyper::Response<Incoming>, DockerError> {
        let mut sender = self.sender().await?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "docker")
            .body(Empty::new())
            .map_err(|_| DockerError::Status {
                path: path.into(),
                status: 0,
                body: "not a request path".into(),
            })?;
        let resp = sender.send_request(req).await.map_err(DockerError::Http)?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = collect(resp.into_body()).await.unwrap_or_default();
            let body = String::from_utf8_lossy(&body).trim().to_string();
            return Err(DockerError::Status {
                path: path.into(),
                status,
                body,
            });
        }
        Ok(resp)
    }

    /// The API version prefix: the daemon's own version if it is older
    /// than [`api::PINNED`], else that; asked once.
    async fn prefix(&self) -> Result<&str, DockerError> {
        self.prefix
            .get_or_try_init(|| async {
                let body = collect(self.request("/version").await?.into_body()).await?;
                let v: api::Version =
                    serde_json::from_slice(&body).map_err(|source| DockerError::Json {
                        path: "/version".into(),
                        source,
                    })?;
                let theirs = v
                    .api_version
                    .split_once('.')
                    .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
                let (major, minor) = theirs.map_or(api::PINNED, |t| t.min(api::PINNED));
                Ok(format!("/v{major}.{minor}"))
            })
            .await
            .map(String::as_str)
    }

    /// GETs `path` at the pinned API version and reads the answer into `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let full = format!("{}{path}", self.prefix().await?);
        let body = collect(self.request(&full).await?.into_body()).await?;
        serde_json::from_slice(&body).map_err(|source| DockerError::Json {
            path: path.into(),
            source,
        })
    }

    /// Opens `GET /events` for container events.
    pub async fn events(&self) -> Result<Events, DockerError> {
        let filters =
            r#"{"type":["container"],"event":["start","rename","die","destroy","health_status"]}"#;
        let path = format!(
            "{}/events?filters={}",
            self.prefix().await?,
            percent_encode(filters)
        );
        Ok(Events {
            body: self.request(&path).await?.into_body(),
            lines: EventLines::default(),
        })
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Empty<Bytes>>, DockerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(DockerError::Http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn collect(mut body: Incoming) -> Result<Vec<u8>, DockerError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(DockerError::Http)?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
            if out.len() > MAX_BODY {
                return Err(DockerError::TooLarge);
            }
        }
    }
    Ok(out)
}

/// Percent-encodes everything but unreserved characters, for a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `/events` stream: one JSON object per line.
pub struct Events {
    body: Incoming,
    lines: EventLines,
}

impl Events {
    /// The next event; `None` when Docker closes the stream.
    pub async fn next(&mut self) -> Option<Result<api::Event, DockerError>> {
        loop {
            if let Some(event) = self.lines.next_event() {
                return Some(event);
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.lines.push(&data);
                    }
                }
                Err(e) => return Some(Err(DockerError::Http(e))),
            }
        }
    }
}

/// Longest event line kept; Docker's are well under a kilobyte.
pub const MAX_EVENT_LINE: usize = 1 << 20;

/// Splits the event stream into JSON lines, pure so that it can be tested
/// and fuzzed. A line over [`MAX_EVENT_LINE`] is reported once and skipped
/// up to its end, so a broken peer cannot grow the buffer or loop on it.
#[derive(Debug, Default)]
pub struct EventLines {
    buf: Vec<u8>,
    /// Inside an overlong line: drop bytes until its newline.
    skipping: bool,
}

impl EventLines {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole line as an event, if one is buffered.
    pub fn next_event(&mut self) -> Option<Result<api::Event, DockerError>> {
        loop {
            let Some(nl) = self.buf.iter().position(|b| *b == b'\n') else {
                if self.buf.len() > MAX_EVENT_LINE {
                    self.buf.clear();
                    if !self.skipping {
                        self.skipping = true;
                        return Some(Err(DockerError::LongLine));
                    }
                }
                return None;
            };
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            if std::mem::take(&mut self.skipping) || line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(serde_json::from_slice(&line).map_err(DockerError::BadEvent));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let d = Docker::from_setting(Some("unix:///tmp/d.sock"))
            .unwrap()
            .unwrap();
        assert_eq!(d.endpoint, Endpoint::Unix("/tmp/d.sock".into()));
        let d = Docker::from_setting(Some("tcp://127.0.0.1:2375"))
            .unwrap()
            .unwrap();
        assert_eq!(d.endpoint, Endpoint::Tcp("127.0.0.1:2375".into()));
        assert!(Docker::from_setting(Some("none")).unwrap().is_none());
        assert!(Docker::from_setting(Some("http://x")).is_err());
        assert_eq!(percent_encode("{\"a\":[1]}"), "%7B%22a%22%3A%5B1%5D%7D");
    }

    #[test]
    fn event_lines_split_skip_blank_and_survive_an_overlong_line() {
        let mut l = EventLines::default();
        l.push(b"{\"Action\":\"start\"}\n\n{\"Action\"");
        assert_eq!(l.next_event().unwrap().unwrap().action(), "start");
        assert!(l.next_event().is_none());
        l.push(b":\"die\"}\nnot json\n");
        assert_eq!(l.next_event().unwrap().unwrap().action(), "die");
        assert!(l.next_event().unwrap().is_err());
        // An endless line: reported once, memory stays bounded, and the
        // stream goes on after its newline.
        let chunk = vec![b'x'; MAX_EVENT_LINE / 2 + 1];
        let mut errors = 0;
        for _ in 0..6 {
            l.push(&chunk);
            while let Some(e) = l.next_event() {
                assert!(e.is_err());
                errors += 1;
            }
            assert!(l.buf.len() <= MAX_EVENT_LINE + chunk.len());
        }
        assert_eq!(errors, 1);
        l.push(b"tail of the long line\n{\"status\":\"destroy\"}\n");
        assert_eq!(l.next_event().unwrap().unwrap().action(), "destroy");
    }
}
