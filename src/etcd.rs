//! A minimal etcd v3 client over etcd's HTTP/JSON gateway (issue 12,
//! second slice, not wired in yet): leases (grant, keep-alive, revoke),
//! put under a lease, delete, and read a prefix.
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
                Ok(Ok((code, v))) => {
                    // An answer from etcd itself: another member would
                    // say the same.
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
            let text = |field: &str| B64.decode(kv[field].as_str().unwrap_or("")).ok();
            let (Some(key), Some(value)) = (text("key"), text("value")) else {
                return Err(bad("range", kv));
            };
            out.push(Kv {
                key: String::from_utf8(key).map_err(|_| bad("range", kv))?,
                value,
                lease: int(&kv["lease"]).unwrap_or(0),
            });
        }
        Ok((revision, out))
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
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    Ok((code, v))
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
