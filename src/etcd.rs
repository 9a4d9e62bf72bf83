//! A minimal etcd v3 client over etcd's HTTP/JSON gateway (issue 12,
//! second slice, not wired in yet): leases (grant, keep-alive, revoke),
//! put under a lease, delete, read a prefix, and watch it from a revision.
//!
//! Why the gateway: etcd serves it on the client port of every member (3.4
//! and later), it needs nothing beyond the hyper client already in the
//! tree, and it keeps one gRPC stack (tonic 0.14 for xDS) in the binary.
//! Keys and values travel base64-encoded; 64-bit numbers as strings.
//!
//! Every call goes to the members in turn until one answers, with a time
//! limit per member, so one dead member costs one timeout, not the call.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::time::Duration;

/// Longest answer accepted from etcd (a prefix read of a big fleet).
const MAX_BODY: usize = 64 << 20;

/// How long one member gets to answer one call.
const PER_MEMBER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bad etcd endpoint {0:?}: want http://IP:PORT")]
    BadEndpoint(String),
    #[error("no etcd member answered: {0}")]
    Unreachable(String),
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

/// A watch on a prefix: `next` gives the changes one etcd revision at a
/// time, in order.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next batch of changes and its revision. An error ends the
    /// watch; the caller reads the prefix again and watches anew.
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>), Error> {
        loop {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).map_err(|e| Error::BadAnswer {
                    call: "watch",
                    detail: e.to_string(),
                })?;
                if let Some(batch) = watch_batch(&v)? {
                    return Ok(batch);
                }
            }
            if self.buf.len() > MAX_BODY {
                return Err(Error::WatchEnded("an answer line is too long".into()));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(Error::WatchEnded(e.to_string())),
                None => return Err(Error::WatchEnded("etcd closed the stream".into())),
            }
        }
    }
}

/// One line of the watch stream: a batch of events, or `None` for the
/// lines that carry none (created, progress).
fn watch_batch(v: &Value) -> Result<Option<(i64, Vec<Event>)>, Error> {
    let r = &v["result"];
    if let Some(rev) = int(&r["compact_revision"]).filter(|r| *r > 0) {
        return Err(Error::Compacted(rev));
    }
    if r["canceled"].as_bool() == Some(true) {
        let why = r["cancel_reason"].as_str().unwrap_or("canceled by etcd");
        return Err(Error::WatchEnded(why.into()));
    }
    if !v["error"].is_null() {
        return Err(Error::WatchEnded(v["error"].to_string()));
    }
    let Some(events) = r["events"].as_array() else {
        return Ok(None);
    };
    let revision = int(&r["header"]["revision"]).ok_or_else(|| bad("watch", v))?;
    let mut out = Vec::new();
    for e in events {
        let kv = kv_of(&e["kv"]).ok_or_else(|| bad("watch", e))?;
        out.push(match e["type"].as_str() {
            Some("DELETE") => Event::Delete(kv.key),
            // PUT is the default, so etcd leaves the type out.
            None | Some("PUT") => Event::Put(kv),
            Some(_) => return Err(bad("watch", e)),
        });
    }
    Ok(Some((revision, out)))
}

/// A key-value from etcd's JSON, base64 decoded.
fn kv_of(kv: &Value) -> Option<Kv> {
    let text = |field: &str| B64.decode(kv[field].as_str().unwrap_or("")).ok();
    Some(Kv {
        key: String::from_utf8(text("key")?).ok()?,
        value: text("value")?,
        lease: int(&kv["lease"]).unwrap_or(0),
    })
}

#[derive(Debug, Clone)]
pub struct Etcd {
    /// `host:port` of each member, in the order given.
    members: Vec<String>,
}

/// One key and value read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

impl Etcd {
    /// `http://IP:PORT[,http://IP:PORT...]`, as `serve --catalog etcd=` takes.
    pub fn new(endpoints: &str) -> Result<Etcd, Error> {
        let members = endpoints
            .split(',')
            .map(|e| {
                let e = e.trim();
                let hostport = e
                    .strip_prefix("http://")
                    .map(|h| h.trim_end_matches('/'))
                    .filter(|h| h.parse::<std::net::SocketAddr>().is_ok())
                    .ok_or_else(|| Error::BadEndpoint(e.into()))?;
                Ok(hostport.to_string())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Etcd { members })
    }

    async fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value, Error> {
        let mut failures = Vec::new();
        for m in &self.members {
            match tokio::time::timeout(PER_MEMBER, post(m, path, &body)).await {
                Ok(Ok((200, v))) => return Ok(v),
                // This member cannot serve now (no leader, cut off from
                // the others): another may.
                Ok(Ok((code, v))) if code >= 500 => failures.push(format!(
                    "{m}: HTTP {code} {}",
                    v["message"].as_str().unwrap_or("")
                )),
                Ok(Ok((code, v))) => {
                    // A refusal of the request itself: another member
                    // would say the same.
                    let detail = v["message"]
                        .as_str()
                        .or(v["error"].as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("HTTP {code}"));
                    return Err(Error::Refused { call, detail });
                }
                Ok(Err(e)) => failures.push(format!("{m}: {e}")),
                Err(_) => failures.push(format!("{m}: no answer in {PER_MEMBER:?}")),
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64, Error> {
        let v = self
            .call("lease grant", "/v3/lease/grant", json!({ "TTL": ttl }))
            .await?;
        int(&v["ID"]).ok_or_else(|| bad("lease grant", &v))
    }

    /// Renews a lease; the TTL left, which is 0 once the lease is gone.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, Error> {
        let v = self
            .call(
                "lease keep-alive",
                "/v3/lease/keepalive",
                json!({ "ID": lease.to_string() }),
            )
            .await?;
        // The gateway wraps the streamed answer in "result"; an expired
        // lease comes back without a TTL.
        Ok(int(&v["result"]["TTL"]).unwrap_or(0))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.call(
            "lease revoke",
            "/v3/lease/revoke",
            json!({ "ID": lease.to_string() }),
        )
        .await
        .map(drop)
    }

    /// Puts `key` = `value`, under `lease` if not 0.
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), Error> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        self.call("put", "/v3/kv/put", body).await.map(drop)
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.call(
            "delete",
            "/v3/kv/deleterange",
            json!({ "key": B64.encode(key) }),
        )
        .await
        .map(drop)
    }

    /// Everything under `prefix`, and the store's revision at that moment.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), Error> {
        let v = self
            .call(
                "range",
                "/v3/kv/range",
                json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) }),
            )
            .await?;
        let revision = int(&v["header"]["revision"]).ok_or_else(|| bad("range", &v))?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            out.push(kv_of(kv).ok_or_else(|| bad("range", kv))?);
        }
        Ok((revision, out))
    }

    /// Watches everything under `prefix` from `revision` on (the one after
    /// a `get_prefix`), on the first member that takes the request.
    pub async fn watch_prefix(&self, prefix: &str, revision: i64) -> Result<Watch, Error> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": revision.to_string(),
        }});
        let mut failures = Vec::new();
        for m in &self.members {
            match tokio::time::timeout(PER_MEMBER, open(m, "/v3/watch", &body)).await {
                Ok(Ok(resp)) if resp.status() == 200 => {
                    return Ok(Watch {
                        body: resp.into_body(),
                        buf: Vec::new(),
                    })
                }
                Ok(Ok(resp)) => failures.push(format!("{m}: HTTP {}", resp.status())),
                Ok(Err(e)) => failures.push(format!("{m}: {e}")),
                Err(_) => failures.push(format!("{m}: no answer in {PER_MEMBER:?}")),
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }
}

/// The end of a prefix range: the prefix with its last byte plus one.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

/// etcd's 64-bit numbers come as strings; a few as numbers.
fn int(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
}

fn bad(call: &'static str, v: &Value) -> Error {
    let mut detail = v.to_string();
    detail.truncate(200);
    Error::BadAnswer { call, detail }
}

async fn post(member: &str, path: &str, body: &Value) -> Result<(u16, Value), String> {
    let resp = open(member, path, body).await?;
    let code = resp.status().as_u16();
    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    Ok((code, v))
}

/// Sends one POST; the answer's head, with its body still to read.
async fn open(
    member: &str,
    path: &str,
    body: &Value,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(member)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", member)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_prefix_ranges() {
        assert!(Etcd::new("http://10.0.0.1:2379, http://[::1]:2379/").is_ok());
        for bad in [
            "",
            "10.0.0.1:2379",
            "https://10.0.0.1:2379",
            "http://etcd:2379",
        ] {
            assert!(Etcd::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end("ab"), b"ac");
        assert_eq!(prefix_end(""), vec![0]);
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(7)), Some(7));
        assert_eq!(int(&json!("x")), None);
    }

    #[test]
    fn watch_lines_become_events_or_errors() {
        let created = json!({"result": {"header": {"revision": "2"}, "created": true}});
        assert_eq!(watch_batch(&created), Ok(None));
        let put = json!({"result": {"header": {"revision": "3"}, "events": [
            {"kv": {"key": "L3AvYQ==", "value": "MQ==", "lease": "7"}},
            {"type": "DELETE", "kv": {"key": "L3AvYg=="}}
        ]}});
        assert_eq!(
            watch_batch(&put),
            Ok(Some((
                3,
                vec![
                    Event::Put(Kv {
                        key: "/p/a".into(),
                        value: b"1".to_vec(),
                        lease: 7
                    }),
                    Event::Delete("/p/b".into())
                ]
            )))
        );
        let compacted = json!({"result": {"compact_revision": "9", "canceled": true}});
        assert_eq!(watch_batch(&compacted), Err(Error::Compacted(9)));
        let odd = json!({"result": {"header": {"revision": "3"}, "events": [
            {"type": "MOVE", "kv": {"key": "L3AvYQ=="}}
        ]}});
        assert!(matches!(watch_batch(&odd), Err(Error::BadAnswer { .. })));
        let bad_key = json!({"result": {"header": {"revision": "3"}, "events": [
            {"kv": {"key": "!!!"}}
        ]}});
        assert!(watch_batch(&bad_key).is_err());
    }

    #[tokio::test]
    async fn no_member_answering_is_an_error_naming_each() {
        // Ports nothing listens on: connections are refused at once.
        let etcd = Etcd::new("http://127.0.0.1:1,http://127.0.0.1:2").unwrap();
        let Err(Error::Unreachable(why)) = etcd.grant(10).await else {
            panic!()
        };
        assert!(
            why.contains("127.0.0.1:1") && why.contains("127.0.0.1:2"),
            "{why}"
        );
    }
}
