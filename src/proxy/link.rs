//! The proxy's connection to the registrar: connect with bounded backoff,
//! register, wait for Envoy's verdict, keep the connection as a sign of life,
//! and deregister on the way out.

use crate::mapping::Mapping;
use crate::protocol::{Connection, Owner, Registration, Reply, Request};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

/// How long a starting proxy keeps trying to reach the registrar.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(4);
/// How long a starting proxy waits for Envoy to accept its listener. With
/// the connect budget this stays well under dockerd's 16 s.
pub const READY_BUDGET: Duration = Duration::from_secs(8);
/// How long deregistration may take when the proxy is told to stop.
pub const DEREGISTER_BUDGET: Duration = Duration::from_secs(1);

/// Envoy's verdict on a registration.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Served,
    Rejected(String),
}

pub struct Link {
    conn: Connection<UnixStream>,
    mapping: Mapping,
}

/// Connects and says hello, retrying with backoff until `budget` is spent.
pub async fn connect(path: &Path, budget: Duration) -> Result<Connection<UnixStream>, String> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(25);
    loop {
        let err = match UnixStream::connect(path).await {
            Ok(stream) => {
                let mut conn = Connection::new(stream);
                match conn.client_hello().await {
                    Ok(()) => return Ok(conn),
                    Err(e) => e,
                }
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() + pause > deadline {
            return Err(format!(
                "cannot reach the envoy-docker registrar at {}: {err} (is `envoy-docker serve` running? set {} to use another socket)",
                path.display(),
                crate::addr::SOCKET_ENV
            ));
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

impl Link {
    /// Registers `mapping` and, when `wait` is set, waits for Envoy's verdict.
    pub async fn register(
        path: &Path,
        mapping: Mapping,
        connect_budget: Duration,
        wait: bool,
    ) -> Result<(Link, Verdict), String> {
        let mut conn = connect(path, connect_budget).await?;
        let req = Request::Register(Registration {
            mapping,
            owner: Owner::Connection,
            wait,
        });
        let reply = timeout(READY_BUDGET, conn.call(&req)).await.map_err(|_| {
            format!(
                "timed out after {}s waiting for Envoy to serve {mapping}",
                READY_BUDGET.as_secs()
            )
        })??;
        let verdict = match reply {
            Reply::Ready | Reply::Accepted => Verdict::Served,
            Reply::Failed(e) => Verdict::Rejected(e),
            Reply::Error(e) => return Err(format!("the registrar refused {mapping}: {e}")),
            other => return Err(format!("unexpected reply from the registrar: {other:?}")),
        };
        Ok((Link { conn, mapping }, verdict))
    }

    /// Resolves when the registrar goes away.
    pub async fn closed(&mut self) {
        loop {
            match self.conn.read_frame::<Reply>().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Removes the mapping, waiting at most [`DEREGISTER_BUDGET`].
    pub async fn deregister(mut self) {
        let req = Request::Deregister(self.mapping.key);
        match timeout(DEREGISTER_BUDGET, self.conn.call(&req)).await {
            Ok(Ok(Reply::Done)) => {}
            Ok(Ok(other)) => {
                eprintln!("envoy-docker proxy: deregistering: unexpected reply {other:?}")
            }
            Ok(Err(e)) => eprintln!("envoy-docker proxy: deregistering: {e}"),
            Err(_) => eprintln!(
                "envoy-docker proxy: deregistering: no answer within {DEREGISTER_BUDGET:?}"
            ),
        }
    }
}

/// Re-registers after the registrar went away, until it answers. Runs for as
/// long as the proxy lives; the caller races it against stop signals.
pub async fn reconnect(path: PathBuf, mapping: Mapping) -> Link {
    let mut pause = Duration::from_millis(50);
    let mut said = false;
    loop {
        match Link::register(&path, mapping, Duration::ZERO, false).await {
            Ok((link, _)) => {
                eprintln!("envoy-docker proxy: registered {mapping} again");
                return link;
            }
            // Said once: the registrar may be down for a while.
            Err(e) if !said => {
                eprintln!("envoy-docker proxy: re-registering {mapping}: {e}; retrying");
                said = true;
            }
            Err(_) => {}
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
