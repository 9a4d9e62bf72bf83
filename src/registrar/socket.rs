//! The registrar's Unix socket: where proxies, resync and status talk to it.
//!
//! The socket is made 0660 inside a directory that only its owner may write.
//! Each peer is identified with SO_PEERCRED: only root and the registrar's
//! own uid may change mappings; anyone who can connect may list them. A bad
//! frame gets an `Error` reply and that connection is closed; the other
//! connections are not affected.

use super::keeper::{Input, Read, Registrar};
use super::liveness::OwnerProcess;
use super::naming::Namer;
use super::state::Arrival;
use crate::addr::ListenError;
use crate::procscan::Trust;
use crate::protocol::{
    ConnError, Connection, MeshCall, MeshIdentity, Owner, Reply, Request, PROTOCOL_VERSION,
};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};

/// Mappings per `Mappings` frame, so a reply stays far below the frame limit.
const LIST_CHUNK: usize = 100;

/// A long answer in frames of [`LIST_CHUNK`] items, each with `more` set
/// but the last; an empty answer is one empty frame.
fn chunked<T: Clone>(items: &[T]) -> Vec<(Vec<T>, bool)> {
    let mut chunks: Vec<Vec<T>> = items.chunks(LIST_CHUNK).map(<[T]>::to_vec).collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i < last))
        .collect()
}

/// How long a deregistration waits for Envoy to drop the listener; below
/// the proxy's own one-second budget.
const CLOSE_BUDGET: std::time::Duration = std::time::Duration::from_millis(800);

/// Prepares the directory, clears a stale socket and binds.
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    const WHAT: &str = "the registrar socket";
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(ListenError::io(WHAT, dir.display()))?;
        }
        if let Ok(meta) = dir.metadata() {
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != 0 && meta.uid() != me {
                tracing::warn!(
                    "{} is owned by uid {}, not by root",
                    dir.display(),
                    meta.uid()
                );
            }
            if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
                tracing::warn!(
                    "{} is writable by others; prefer a 0750 directory",
                    dir.display()
                );
            }
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse {
                what: WHAT,
                at: shown.to_string(),
            });
        }
        std::fs::remove_file(path).map_err(ListenError::io(WHAT, &shown))?;
    }
    let listener = UnixListener::bind(path).map_err(ListenError::io(WHAT, &shown))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(ListenError::io(WHAT, &shown))?;
    Ok(listener)
}

/// How long a peer may take over its hello, or over any frame once begun.
pub const FRAME_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts connections until the caller drops this future, which ends
/// every connection it serves with it.
pub async fn serve(
    listener: UnixListener,
    registrar: Registrar,
    namer: Option<Arc<Namer>>,
    trust: Arc<Trust>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let id = NEXT.fetch_add(1, Ordering::Relaxed);
                    let registrar = registrar.clone();
                    let namer = namer.clone();
                    let trust = trust.clone();
                    connections.spawn(async move {
                        serve_connection(stream, id, &registrar, namer.as_ref(), &trust).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("accept on the registrar socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one peer to its end; its mappings go with it. Public so that
/// the fuzzer drives the very code that serves the socket.
pub async fn serve_connection(
    stream: UnixStream,
    id: u64,
    registrar: &Registrar,
    namer: Option<&Arc<Namer>>,
    trust: &Trust,
) {
    if let Err(e) = handle(stream, id, registrar, namer, trust).await {
        tracing::debug!("registrar connection {id}: {e}");
    }
    registrar.tell(Input::ConnectionClosed(id));
}

fn may_change(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

async fn handle(
    stream: UnixStream,
    id: u64,
    registrar: &Registrar,
    namer: Option<&Arc<Namer>>,
    trust: &Trust,
) -> Result<(), ConnError> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let peer_pid = cred.pid().map(|p| p as u32);
    let mut conn = Connection::new(stream).with_frame_deadline(FRAME_DEADLINE);

    let refuse = |msg: String| Reply::Error(msg);
    let hello = match tokio::time::timeout(FRAME_DEADLINE, conn.read_frame::<Request>()).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!("registrar connection {id}: no hello within {FRAME_DEADLINE:?}");
            return Ok(());
        }
    };
    match hello {
        Ok(Some(Request::Hello { version })) if version == PROTOCOL_VERSION => {
            conn.write_frame(&Reply::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?;
        }
        Ok(Some(Request::Hello { version })) => {
            let msg = format!(
                "protocol version {version} is not supported; this registrar speaks {PROTOCOL_VERSION}"
            );
            return conn.write_frame(&refuse(msg)).await;
        }
        Ok(Some(_)) => {
            return conn
                .write_frame(&refuse("the first frame must be Hello".into()))
                .await
        }
        Ok(None) => return Ok(()),
        Err(e) => return bad_frame(&mut conn, e).await,
    }

    // Orders for this connection's proxy arrive here from the registry.
    let (outbox, mut orders) = tokio::sync::mpsc::unbounded_channel();
    registrar.tell(Input::LinkOpened(id, outbox));
    loop {
        let next = tokio::select! {
            next = conn.read_frame::<Request>() => next,
            order = orders.recv() => match order {
                Some(order) => {
                    conn.write_frame(&order).await?;
                    continue;
                }
                // The registrar dropped this proxy's mapping for a reason
                // of its own: closing makes the proxy register again.
                None => return Ok(()),
            },
        };
        let req = match next {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return bad_frame(&mut conn, e).await,
        };
        match req {
            Request::Hello { .. } => {
                return conn
                    .write_frame(&refuse("Hello may only be sent once".into()))
                    .await
            }
            Request::Envoys => {
                let envoys = registrar.ask(Read::Envoys).await.unwrap_or_default();
                conn.write_frame(&Reply::Envoys(envoys)).await?;
            }
            Request::Ports => {
                let ports = registrar
                    .ask(Read::Ports)
                    .await
                    .unwrap_or(crate::nft::PortsState::Starting);
                conn.write_frame(&Reply::Ports(ports)).await?;
            }
            Request::Mesh => {
                let leaves = registrar
                    .ask(Read::Overview)
                    .await
                    .map(|v| v.mesh)
                    .unwrap_or_default();
                if leaves.is_empty() {
                    conn.write_frame(&Reply::Error(
                        "this registrar is not in a mesh (serve runs without --mesh), or has no leaf yet".into(),
                    ))
                    .await?;
                    continue;
                }
                let mut identities: Vec<MeshIdentity> = leaves
                    .iter()
                    .map(|(id, l)| MeshIdentity {
                        identity: id.clone(),
                        expires: l
                            .not_after
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        issued: l.issued,
                    })
                    .collect();
                let calls: Vec<MeshCall> = registrar
                    .metrics()
                    .mesh_calls()
                    .into_iter()
                    .map(|(service, caller, n)| MeshCall {
                        service,
                        caller,
                        handshakes: n.handshakes,
                        failed: n.failed,
                        denied: n.denied,
                    })
                    .collect();
                for (calls, more) in chunked(&calls) {
                    let identities = std::mem::take(&mut identities);
                    conn.write_frame(&Reply::Mesh {
                        identities,
                        calls,
                        more,
                    })
                    .await?;
                }
            }
            Request::Fleet => {
                let view = registrar.ask(Read::Fleet).await.flatten();
                let Some((host_id, etcd, catalog)) = view else {
                    conn.write_frame(&Reply::Error(
                        "this registrar is not in a fleet (serve runs without --catalog)".into(),
                    ))
                    .await?;
                    continue;
                };
                let rows: Vec<crate::catalog::Row> =
                    catalog.values().map(crate::catalog::Row::from).collect();
                let etcd = super::fleet::describe(&etcd);
                for (items, more) in chunked(&rows) {
                    let (host_id, etcd) = (host_id.clone(), etcd.clone());
                    conn.write_frame(&Reply::Fleet {
                        host_id,
                        etcd,
                        items,
                        more,
                    })
                    .await?;
                }
            }
            Request::List => {
                let all = registrar.ask(Read::List).await.unwrap_or_default();
                for (items, more) in chunked(&all) {
                    conn.write_frame(&Reply::Mappings { items, more }).await?;
                }
            }
            Request::Register(_) | Request::Deregister(_) | Request::Serving { .. }
                if !may_change(uid) =>
            {
                let msg = format!(
                    "permission denied: uid {uid} may not change mappings (only root and uid {} may)",
                    nix::unistd::geteuid()
                );
                return conn.write_frame(&refuse(msg)).await;
            }
            Request::Serving {
                key,
                server,
                relayed,
            } => {
                registrar.tell(Input::Serving {
                    conn: id,
                    key,
                    server,
                    relayed,
                });
            }
            Request::Deregister(key) => {
                let (tx, closed) = tokio::sync::oneshot::channel();
                registrar.tell(Input::Deregister { key, closed: tx });
                // Answer once Envoy has closed the port, as docker-proxy
                // closes its listener before it exits; bounded, so a stuck
                // Envoy cannot hold up `docker stop`.
                let _ = tokio::time::timeout(CLOSE_BUDGET, closed).await;
                conn.write_frame(&Reply::Done).await?;
            }
            Request::Register(reg) => {
                let (owner, tied) = match reg.owner {
                    Owner::Connection => match peer_pid {
                        Some(pid) => (OwnerProcess::of(pid), Some(id)),
                        None => {
                            let msg = "cannot tell the peer's pid (SO_PEERCRED)".to_string();
                            return conn.write_frame(&refuse(msg)).await;
                        }
                    },
                    Owner::Pid(pid) => {
                        let owner = OwnerProcess::of(pid);
                        if !owner.alive() {
                            let msg = format!("pid {pid} is not a running process");
                            conn.write_frame(&refuse(msg)).await?;
                            continue;
                        }
                        // A mapping decides what root's Envoy binds: only
                        // a real proxy may own one.
                        if let Err(why) = trust.admits(pid) {
                            tracing::warn!("refusing a registration for {}: {why}", reg.mapping);
                            conn.write_frame(&refuse(why.to_string())).await?;
                            continue;
                        }
                        (owner, None)
                    }
                };
                let meta = match namer {
                    Some(n) => n.name(reg.mapping.backend.container_ip, registrar).await,
                    None => None,
                };
                let result = registrar
                    .register(Arrival {
                        mapping: reg.mapping,
                        owner,
                        conn: tied,
                        server: reg.server,
                        meta,
                    })
                    .await;
                let reply = match result {
                    Ok(()) => Reply::Accepted,
                    Err(e) => Reply::Error(e.to_string()),
                };
                conn.write_frame(&reply).await?;
            }
        }
    }
}

async fn bad_frame(conn: &mut Connection<UnixStream>, e: ConnError) -> Result<(), ConnError> {
    match e {
        ConnError::Frame(f) => {
            tracing::warn!("closing a registrar connection: {f}");
            conn.write_frame(&Reply::Error(f.to_string())).await
        }
        other => Err(other),
    }
}
