//! The etcd v3 calls the fleet makes, over etcd's gRPC API through the
//! `etcd-client` crate: leases (grant, a kept-alive lease stream, revoke),
//! puts and deletes batched in transactions, a prefix read, and a watch on
//! the prefix from a revision.
//!
//! - **One kept connection, member failover.** Calls, leases and watches
//!   go to one member at a time, the current one, over one kept HTTP/2
//!   connection. A member that cannot serve a call (refused, down, no
//!   answer in time, no leader) hands the call to the next member, which
//!   becomes the current one. HTTP/2 pings (every 5 s, the least etcd
//!   accepts by default, with 2 s to answer) find a connection whose peer
//!   went silent, such as a member whose link is down. (Not tonic's
//!   balanced channel across members: it keeps sending calls to a member
//!   it cannot connect to.)
//! - **Leader required.** Every call carries etcd's `hasleader` header: a
//!   member that is alive but cut off from the quorum refuses calls and
//!   ends its watches instead of answering from a stale store.
//! - **Watches** ask for progress notifications; `Watch::next` also hands
//!   out the empty batches, so the caller can tell a quiet catalog from a
//!   silent stream, and resume from `Watch::revision` after a failure.
//! - **Time limits.** Each unary call has `CALL_LIMIT`; a member that does
//!   not answer is an `Unreachable` error, never a hang.

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one unary call (or one lease renewal) may take.
const CALL_LIMIT: Duration = Duration::from_secs(3);

/// etcd refuses a transaction of more operations than this
/// (`--max-txn-ops`, 128 by default).
const TXN_OPS: usize = 128;

/// Longest answer accepted from etcd (a prefix read of a big fleet).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bad etcd endpoint {0:?}: want http://IP:PORT")]
    BadEndpoint(String),
    #[error("no etcd member answered {call}: {detail}")]
    Unreachable { call: &'static str, detail: String },
    #[error("etcd refused {call}: {detail}")]
    Refused { call: &'static str, detail: String },
    #[error("etcd's answer to {call} is not understood: {detail}")]
    BadAnswer { call: &'static str, detail: String },
    #[error("etcd has compacted the history before revision {0}; read the prefix again")]
    Compacted(i64),
    #[error("the watch ended: {0}")]
    WatchEnded(String),
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete(String),
}

/// One key and value read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The key and value, put under the batch's lease.
    Put(String, Vec<u8>),
    Delete(String),
}

/// Checks `http://IP:PORT[,http://IP:PORT...]`, as `serve --catalog
/// etcd=` takes it; the members' URLs.
pub fn endpoints(list: &str) -> Result<Vec<String>, Error> {
    list.split(',')
        .map(|e| {
            let e = e.trim();
            e.strip_prefix("http://")
                .map(|h| h.trim_end_matches('/'))
                .filter(|h| h.parse::<std::net::SocketAddr>().is_ok())
                .map(|h| format!("http://{h}"))
                .ok_or_else(|| Error::BadEndpoint(e.into()))
        })
        .collect()
}

/// Sorts a failed call: a member that could not serve it (down, no
/// leader, too slow) is `Unreachable`, and another try may work; etcd
/// turning the request itself down is `Refused`.
fn failed(call: &'static str, e: etcd_client::Error) -> Error {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::Internal => Error::Unreachable {
                call,
                detail: s.message().to_string(),
            },
            _ => Error::Refused {
                call,
                detail: s.message().to_string(),
            },
        },
        other => Error::Unreachable {
            call,
            detail: other.to_string(),
        },
    }
}

/// Runs one call within `CALL_LIMIT`.
async fn limited<T>(
    call: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(CALL_LIMIT, f).await {
        Ok(r) => r.map_err(|e| failed(call, e)),
        Err(_) => Err(Error::Unreachable {
            call,
            detail: format!("no answer in {CALL_LIMIT:?}"),
        }),
    }
}

fn kv_of(call: &'static str, kv: &etcd_client::KeyValue) -> Result<Kv, Error> {
    let key = String::from_utf8(kv.key().to_vec()).map_err(|_| Error::BadAnswer {
        call,
        detail: format!("a key that is not UTF-8: {:?}", kv.key()),
    })?;
    Ok(Kv {
        key,
        value: kv.value().to_vec(),
        lease: kv.lease(),
    })
}

/// A client of one etcd cluster. Cheap to clone: clones share the
/// connections and the choice of member.
#[derive(Clone)]
pub struct Etcd {
    /// One client per member, in the order given; each connects lazily.
    members: Arc<[(String, Client)]>,
    /// The member calls go to first.
    current: Arc<AtomicUsize>,
}

impl Etcd {
    /// A client of the members `list` (see `endpoints`). Connects lazily:
    /// members that are down now are not an error.
    pub async fn connect(list: &str) -> Result<Etcd, Error> {
        let options = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(2))
            .with_keep_alive_while_idle(false)
            .with_connect_timeout(Duration::from_secs(1))
            .with_require_leader(true);
        let mut members = Vec::new();
        for url in endpoints(list)? {
            let client = Client::connect([&url], Some(options.clone()))
                .await
                .map_err(|e| Error::BadEndpoint(format!("{url}: {e}")))?;
            members.push((url, client));
        }
        Ok(Etcd {
            members: members.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The URL of the member calls go to now.
    pub fn member(&self) -> &str {
        &self.members[self.current.load(Ordering::Relaxed) % self.members.len()].0
    }

    /// Moves off `url` if it is still the current member: something on
    /// it (a watch) went silent, though calls may still get through.
    pub fn shun(&self, url: &str) {
        let now = self.current.load(Ordering::Relaxed) % self.members.len();
        if self.members[now].0 == url {
            let _ = self.current.compare_exchange(
                now,
                (now + 1) % self.members.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Runs `f` on the current member, then on each other in turn while
    /// the failure is one another member could do better on.
    async fn call<T, F, Fut>(&self, call: &'static str, f: F) -> Result<T, Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(call, f).await.map(|(v, _)| v)
    }

    /// `call`, and the URL of the member that served it.
    async fn call_on<T, F, Fut>(&self, call: &'static str, f: F) -> Result<(T, String), Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let (url, client) = &self.members[i];
            match limited(call, f(client.clone())).await {
                Ok(v) => {
                    if i != first {
                        self.current.store(i, Ordering::Relaxed);
                        tracing::info!("etcd: now using member {url}");
                    }
                    return Ok((v, url.clone()));
                }
                Err(Error::Unreachable { detail, .. }) => failures.push(format!("{url}: {detail}")),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unreachable {
            call,
            detail: failures.join("; "),
        })
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64, Error> {
        let ttl = i64::try_from(ttl).unwrap_or(i64::MAX);
        let r = self
            .call("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        Ok(r.id())
    }

    /// Opens the keep-alive stream of `lease`, which renews it once;
    /// `None` if the lease is gone (expired or revoked).
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<Lease>, Error> {
        let (kept, member) = self
            .call_on("lease keep-alive", |mut c| async move {
                match c.lease_keep_alive(lease).await {
                    Ok((keeper, stream)) => Ok(Some((keeper, stream))),
                    // The crate's word for a first renewal that found no TTL.
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(kept.map(|(keeper, stream)| Lease {
            keeper,
            stream,
            member,
        }))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.call("lease revoke", |mut c| async move {
            c.lease_revoke(lease).await
        })
        .await
        .map(drop)
    }

    /// Carries out `writes` in order, puts under `lease` if not 0, in as
    /// few transactions as etcd takes.
    pub async fn write(&self, writes: &[Write], lease: i64) -> Result<(), Error> {
        for chunk in writes.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|w| match w {
                    Write::Put(k, v) => {
                        let o = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                        TxnOp::put(k.as_bytes(), v.clone(), o)
                    }
                    Write::Delete(k) => TxnOp::delete(k.as_bytes(), None::<DeleteOptions>),
                })
                .collect();
            self.call("txn", |mut c| {
                let txn = Txn::new().and_then(ops.clone());
                async move { c.txn(txn).await }
            })
            .await?;
        }
        Ok(())
    }

    /// Puts `key` = `value`, under `lease` if not 0.
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), Error> {
        self.write(&[Write::Put(key.into(), value.to_vec())], lease)
            .await
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.write(&[Write::Delete(key.into())], 0).await
    }

    /// Everything under `prefix`, and the store's revision at that moment.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), Error> {
        let r = self
            .call("range", |c| async move {
                let mut kv = c.kv_client().max_decoding_message_size(MAX_MESSAGE);
                kv.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let revision = r.header().map(|h| h.revision()).ok_or(Error::BadAnswer {
            call: "range",
            detail: "no header".into(),
        })?;
        let kvs = r
            .kvs()
            .iter()
            .map(|kv| kv_of("range", kv))
            .collect::<Result<_, _>>()?;
        Ok((revision, kvs))
    }

    /// Watches everything under `prefix` from `revision` on (the one after
    /// a `get_prefix`). Returns once etcd has taken the watch; history it
    /// has compacted away is `Error::Compacted`.
    pub async fn watch_prefix(&self, prefix: &str, revision: i64) -> Result<Watch, Error> {
        let ((stream, first), member) = self
            .call_on("watch", |c| async move {
                let mut w = c.watch_client().max_decoding_message_size(MAX_MESSAGE);
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision)
                    .with_progress_notify();
                let mut stream = w.watch(prefix, Some(options)).await?;
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .await?;
        let w = Watch {
            stream,
            member,
            revision: revision - 1,
            heard: Instant::now(),
        };
        match first {
            Some(r) if r.created() => {
                w.check(&r)?;
                Ok(w)
            }
            Some(r) => Err(w.check(&r).err().unwrap_or(Error::BadAnswer {
                call: "watch",
                detail: "the first answer does not create the watch".into(),
            })),
            None => Err(Error::WatchEnded("etcd closed the stream".into())),
        }
    }
}

/// A lease's keep-alive stream.
pub struct Lease {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// The member the stream is on.
    member: String,
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.keeper.id()
    }

    /// The URL of the member the stream is on.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// Renews the lease; the TTL left, which is 0 once it is gone.
    pub async fn renew(&mut self) -> Result<i64, Error> {
        let call = "lease keep-alive";
        limited(call, self.keeper.keep_alive()).await?;
        match limited(call, self.stream.message()).await? {
            Some(r) => Ok(r.ttl().max(0)),
            None => Err(Error::Unreachable {
                call,
                detail: "etcd closed the lease stream".into(),
            }),
        }
    }
}

/// A watch on a prefix.
pub struct Watch {
    stream: WatchStream,
    /// The member it is on.
    member: String,
    /// The last revision whose changes have all been handed out.
    revision: i64,
    /// When etcd last said anything on this watch.
    heard: Instant,
}

impl Watch {
    /// The next batch of changes and its revision; an empty batch is a
    /// progress notification. An error ends the watch: the caller
    /// watches again from `revision() + 1`.
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>), Error> {
        let r = match self.stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Error::WatchEnded("etcd closed the stream".into())),
            Err(e) => return Err(Error::WatchEnded(failed("watch", e).to_string())),
        };
        self.heard = Instant::now();
        self.check(&r)?;
        let mut out = Vec::with_capacity(r.events().len());
        for e in r.events() {
            let kv = e.kv().ok_or(Error::BadAnswer {
                call: "watch",
                detail: "an event without a key".into(),
            })?;
            let kv = kv_of("watch", kv)?;
            out.push(match e.event_type() {
                EventType::Put => Event::Put(kv),
                EventType::Delete => Event::Delete(kv.key),
            });
        }
        if let Some(h) = r.header() {
            self.revision = self.revision.max(h.revision());
        }
        Ok((self.revision, out))
    }

    /// Asks etcd to say where the watch stands; the answer comes through
    /// `next` as an empty batch.
    pub async fn request_progress(&mut self) -> Result<(), Error> {
        limited("watch progress", self.stream.request_progress()).await
    }

    /// The last revision whose changes have all been handed out.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The URL of the member the watch is on.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// How long etcd has said nothing on this watch.
    pub fn quiet_for(&self) -> Duration {
        self.heard.elapsed()
    }

    fn check(&self, r: &etcd_client::WatchResponse) -> Result<(), Error> {
        if r.compact_revision() > 0 {
            return Err(Error::Compacted(r.compact_revision()));
        }
        if r.canceled() {
            let why = match r.cancel_reason() {
                "" => "canceled by etcd",
                why => why,
            };
            return Err(Error::WatchEnded(why.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            endpoints("http://10.0.0.1:2379, http://[::1]:2379/").unwrap(),
            ["http://10.0.0.1:2379", "http://[::1]:2379"]
        );
        for bad in [
            "",
            "10.0.0.1:2379",
            "https://10.0.0.1:2379",
            "http://etcd:2379",
        ] {
            assert!(endpoints(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failures_are_sorted_by_what_a_retry_could_change() {
        let unavailable = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader"));
        assert!(matches!(
            failed("put", unavailable),
            Error::Unreachable { call: "put", .. }
        ));
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::not_found("lease not found"));
        assert_eq!(
            failed("put", refused),
            Error::Refused {
                call: "put",
                detail: "lease not found".into()
            }
        );
    }

    #[tokio::test]
    async fn no_member_answering_is_an_error_not_a_hang() {
        // Ports nothing listens on: connections are refused at once.
        let etcd = Etcd::connect("http://127.0.0.1:1,http://127.0.0.1:2")
            .await
            .unwrap();
        assert!(matches!(
            etcd.grant(10).await,
            Err(Error::Unreachable {
                call: "lease grant",
                ..
            })
        ));
    }
}
