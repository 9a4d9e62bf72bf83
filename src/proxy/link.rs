//! The proxy's connection to the registrar: register, hear who should serve
//! the port, and report what the proxy did. The open connection is the
//! mapping's life: it ends when the connection does.
//!
//! Nothing here may hold up the data path: every step has a deadline, one
//! attempt is made per call, and the caller (`proxy::serve`) decides when to
//! try again. The open connection is also the proxy's sign of life.

use crate::mapping::{Mapping, MappingKey, Server};
use crate::protocol::client::connect_once;
pub use crate::protocol::client::{Failure, STEP_BUDGET};
use crate::protocol::{Connection, Owner, Registration, Reply, Request};
use std::path::Path;
use tokio::net::UnixStream;
use tokio::time::timeout;

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
            Ok(Ok(Reply::Error(e))) => Err(Failure::Refused(format!(
                "the registrar refused {mapping}: {e}"
            ))),
            Ok(Ok(other)) => Err(Failure::Other(format!(
                "unexpected reply from the registrar: {other:?}"
            ))),
            Ok(Err(e)) => Err(Failure::of_call("the registration", e)),
            Err(_) => Err(Failure::Hung(
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
}
