//! The client side of the registrar socket, for every role that talks to
//! the registrar (the proxy, `status`, `resync`): connect and say hello
//! within deadlines, and tell "nobody is listening" from other failures.

use super::Connection;
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

/// The most one step (connect, hello, register, report) may take.
pub const STEP_BUDGET: Duration = Duration::from_secs(2);

/// Why an attempt failed. Each carries the whole message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Nobody listens on the socket (missing or refused): the registrar is
    /// not running, and waiting would not help a starting proxy.
    #[error("{0}")]
    Unreachable(String),
    /// Connected, but no answer in time: a hung registrar.
    #[error("{0}")]
    Hung(String),
    /// The registrar said no.
    #[error("{0}")]
    Refused(String),
    /// Anything else: a broken connection, an answer that does not fit.
    #[error("{0}")]
    Other(String),
}

/// Why a role's talk with the registrar ended early: it was never reached
/// (or hung), or a call on the connection went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Unreachable(#[from] Failure),
    #[error(transparent)]
    Call(#[from] super::CallError),
}

impl Failure {
    pub fn text(&self) -> &str {
        match self {
            Failure::Unreachable(t)
            | Failure::Hung(t)
            | Failure::Refused(t)
            | Failure::Other(t) => t,
        }
    }

    /// A failed call, sorted by kind.
    pub fn of_call(what: &str, e: super::CallError) -> Failure {
        match e {
            super::CallError::Refused(why) => {
                Failure::Refused(format!("the registrar refused {what}: {why}"))
            }
            other => Failure::Other(format!("{what}: {other}")),
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
        Err(_) => return Err(Failure::Hung(unreachable_text(path, "connect timed out"))),
    };
    let mut conn = Connection::new(stream);
    match timeout(STEP_BUDGET, conn.client_hello()).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(super::CallError::Refused(e))) => Err(Failure::Refused(format!(
            "the registrar at {} refused the hello: {e}",
            path.display()
        ))),
        Ok(Err(e)) => Err(Failure::Other(unreachable_text(path, &e.to_string()))),
        Err(_) => Err(Failure::Hung(unreachable_text(
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
pub async fn connect(path: &Path, budget: Duration) -> Result<Connection<UnixStream>, Failure> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(25);
    loop {
        let err = match connect_once(path).await {
            Ok(conn) => return Ok(conn),
            Err(e) => e,
        };
        // A refusal will not change by waiting.
        if Instant::now() + pause > deadline || matches!(err, Failure::Refused(_)) {
            return Err(err);
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
