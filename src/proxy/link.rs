//! The proxy's connection to the registrar: register, hear who should serve
//! the port, report what the proxy did, and deregister on the way out.
//!
//! Nothing here may hold up the data path: every step has a deadline, one
//! attempt is made per call, and the caller (`proxy::serve`) decides when to
//! try again. The open connection is also the proxy's sign of life.

use crate::mapping::{Mapping, MappingKey, Server};
use crate::protocol::{Connection, Owner, Registration, Reply, Request};
use crate::proxy::say::say;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

/// The most one step (connect, hello, register, report) may take.
pub const STEP_BUDGET: Duration = Duration::from_secs(2);
/// How long deregistration may take when the proxy is told to stop.
pub const DEREGISTER_BUDGET: Duration = Duration::from_secs(1);

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Nobody listens on the socket (missing or refused): the registrar is
    /// not running, and waiting would not help a starting proxy.
    Unreachable(String),
    /// Anything else: a timeout, a refusal, a protocol error.
    Other(String),
}

impl Failure {
    pub fn text(&self) -> &str {
        match self {
            Failure::Unreachable(t) | Failure::Other(t) => t,
        }
    }
}

/// One connect and hello, bounded by [`STEP_BUDGET`] each.
pub async fn connect_once(path: &Path) -> Result<Connection<UnixStream>, Failure> {
    let stream = match timeout(STEP_BUDGET, UnixStream::connect(path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let msg = unreachable_text(path, &e.to_string());
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    Failure::Unreachable(msg)
                }
                _ => Failure::Other(msg),
            });
        }
        Err(_) => return Err(Failure::Other(unreachable_text(path, "connect timed out"))),
    };
    let mut conn = Connection::new(stream);
    match timeout(STEP_BUDGET, conn.client_hello()).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err(Failure::Other(unreachable_text(path, &e))),
        Err(_) => Err(Failure::Other(unreachable_text(
            path,
            "no answer to hello (is the registrar hung?)",
        ))),
    }
}

fn unreachable_text(path: &Path, err: &str) -> String {
    format!(
        "cannot reach the envoy-docker registrar at {}: {err} (is `envoy-docker serve` running? set {} to use another socket)",
        path.display(),
        crate::addr::SOCKET_ENV
    )
}

/// Connects and says hello, retrying with backoff until `budget` is spent.
/// For the short-lived commands (`status`, `resync`).
pub async fn connect(path: &Path, budget: Duration) -> Result<Connection<UnixStream>, String> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(25);
    loop {
        let err = match connect_once(path).await {
            Ok(conn) => return Ok(conn),
            Err(e) => e,
        };
        if Instant::now() + pause > deadline {
            return Err(err.text().to_string());
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

pub struct Link {
    conn: Connection<UnixStream>,
    key: MappingKey,
}

impl Link {
    /// Registers `mapping`, saying who serves it now; one attempt.
    pub async fn register(path: &Path, mapping: Mapping, server: Server) -> Result<Link, Failure> {
        let mut conn = connect_once(path).await?;
        let req = Request::Register(Registration {
            mapping,
            owner: Owner::Connection,
            server,
        });
        match timeout(STEP_BUDGET, conn.call(&req)).await {
            Ok(Ok(Reply::Accepted)) => Ok(Link {
                conn,
                key: mapping.key,
            }),
            Ok(Ok(Reply::Error(e))) => Err(Failure::Other(format!(
                "the registrar refused {mapping}: {e}"
            ))),
            Ok(Ok(other)) => Err(Failure::Other(format!(
                "unexpected reply from the registrar: {other:?}"
            ))),
            Ok(Err(e)) => Err(Failure::Other(e)),
            Err(_) => Err(Failure::Other(
                "the registrar did not answer the registration".into(),
            )),
        }
    }

    /// The registrar's next order; `None` once it has gone away. Cancel-safe.
    pub async fn next_order(&mut self) -> Option<Server> {
        loop {
            match self.conn.read_frame::<Reply>().await {
                Ok(Some(Reply::Serve(s))) => return Some(s),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Tells the registrar who serves now. A failure shows up as the
    /// connection closing, in [`Link::next_order`].
    pub async fn report(&mut self, server: Server, relayed: u64) {
        let req = Request::Serving {
            key: self.key,
            server,
            relayed,
        };
        let _ = timeout(STEP_BUDGET, self.conn.write_frame(&req)).await;
    }

    /// Removes the mapping, waiting at most [`DEREGISTER_BUDGET`].
    pub async fn deregister(mut self) {
        let req = Request::Deregister(self.key);
        match timeout(DEREGISTER_BUDGET, self.conn.call(&req)).await {
            Ok(Ok(Reply::Done)) => {}
            Ok(Ok(other)) => say(&format!("deregistering: unexpected reply {other:?}")),
            Ok(Err(e)) => say(&format!("deregistering: {e}")),
            Err(_) => say(&format!(
                "deregistering: no answer within {DEREGISTER_BUDGET:?}"
            )),
        }
    }
}
