//! The nftables table that claims published ports, as nft's JSON: built
//! from the set of claimed mappings, and read back from `nft -j list`.
//! Pure: no process is run here.
//!
//! ```text
//! table inet envoy-docker {
//!   set tcp4 { type inet_service }                    # 0.0.0.0 bindings
//!   set tcp6 { type inet_service }                    # :: bindings
//!   set tcp4_at { type ipv4_addr . inet_service }     # one host address
//!   set tcp6_at { type ipv6_addr . inet_service }
//!   (the same four for udp)
//!   chain claim {
//!     meta nfproto ipv4 tcp dport @tcp4 redirect
//!     meta nfproto ipv6 tcp dport @tcp6 redirect
//!     (the same for udp4, udp6)
//!     ip daddr . tcp dport @tcp4_at dnat ip to ip daddr
//!     ip6 daddr . tcp dport @tcp6_at dnat ip6 to ip6 daddr
//!     (the same for udp4_at, udp6_at)
//!   }
//!   chain prerouting { type nat hook prerouting priority -101; fib daddr type local jump claim }
//!   chain output     { type nat hook output priority -101; fib daddr type local jump claim }
//! }
//! ```
//!
//! Why it works: netfilter binds a connection's destination NAT in the
//! first nat chain, by priority, that performs one, and skips the later nat
//! chains of that hook for the connection. Docker's nat chains sit at -100
//! (iptables' `nat` table, through iptables-nft or legacy, and Docker 29's
//! own `docker-bridges` tables), so at -101 a claimed port's connection is
//! bound here first and never DNATed to the container. `redirect` sends a
//! wildcard binding's packets to the incoming interface's primary address
//! (loopback on `output`), where the proxy's or Envoy's socket accepts
//! them; a binding to one host address is DNATed to that same address,
//! since `redirect` would pick another one. `fib daddr type local` keeps
//! everything not addressed to this host, Envoy's own connections to
//! containers among it, out of the chain.

use crate::mapping::{MappingKey, Proto};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The table's name, in family `inet` (IPv4 and IPv6 at once).
pub const TABLE: &str = "envoy-docker";
/// One ahead of Docker's dstnat chains at -100.
pub const PRIORITY: i64 = -101;

/// The mappings whose ports are claimed (TCP and UDP only).
pub type Claims = BTreeSet<MappingKey>;

/// The set a mapping's element goes in, or `None` for what is never
/// claimed (SCTP).
pub fn set_of(key: &MappingKey) -> Option<&'static str> {
    let wildcard = key.host_ip.is_unspecified();
    Some(match (key.proto, key.host_ip, wildcard) {
        (Proto::Tcp, IpAddr::V4(_), true) => "tcp4",
        (Proto::Tcp, IpAddr::V6(_), true) => "tcp6",
        (Proto::Tcp, IpAddr::V4(_), false) => "tcp4_at",
        (Proto::Tcp, IpAddr::V6(_), false) => "tcp6_at",
        (Proto::Udp, IpAddr::V4(_), true) => "udp4",
        (Proto::Udp, IpAddr::V6(_), true) => "udp6",
        (Proto::Udp, IpAddr::V4(_), false) => "udp4_at",
        (Proto::Udp, IpAddr::V6(_), false) => "udp6_at",
        (Proto::Sctp, _, _) => return None,
    })
}

/// Every set: (name, protocol, family, for one host address). The claim
/// chain tests them in this order, so the common case (a wildcard TCP
/// binding) costs one rule; the order is otherwise free, since Docker never
/// publishes one port both on a wildcard and on one address of a family.
const SETS: [(&str, &str, &str, bool); 8] = [
    ("tcp4", "tcp", "ip", false),
    ("tcp6", "tcp", "ip6", false),
    ("udp4", "udp", "ip", false),
    ("udp6", "udp", "ip6", false),
    ("tcp4_at", "tcp", "ip", true),
    ("tcp6_at", "tcp", "ip6", true),
    ("udp4_at", "udp", "ip", true),
    ("udp6_at", "udp", "ip6", true),
];

/// Base chains: (name, hook).
const HOOKS: [(&str, &str); 2] = [("prerouting", "prerouting"), ("output", "output")];

fn element(key: &MappingKey) -> Value {
    if key.host_ip.is_unspecified() {
        json!(key.host_port)
    } else {
        json!({"concat": [key.host_ip.to_string(), key.host_port]})
    }
}

fn set_type(family: &str, at: bool) -> Value {
    match (at, family) {
        (false, _) => json!("inet_service"),
        (true, "ip") => json!(["ipv4_addr", "inet_service"]),
        (true, _) => json!(["ipv6_addr", "inet_service"]),
    }
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

/// The claim chain's rule for one set.
fn claim_rule(set: &str, proto: &str, family: &str, at: bool) -> Value {
    let expr = if at {
        json!([
            {"match": {"op": "==",
                "left": {"concat": [payload(family, "daddr"), payload(proto, "dport")]},
                "right": format!("@{set}")}},
            {"dnat": {"family": family, "addr": payload(family, "daddr")}}
        ])
    } else {
        let nfproto = if family == "ip" { "ipv4" } else { "ipv6" };
        json!([
            {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}},
            {"match": {"op": "==", "left": payload(proto, "dport"), "right": format!("@{set}")}},
            {"redirect": null}
        ])
    };
    json!({"family": "inet", "table": TABLE, "chain": "claim", "expr": expr})
}

fn jump_rule(chain: &str) -> Value {
    json!({"family": "inet", "table": TABLE, "chain": chain, "expr": [
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
        {"jump": {"target": "claim"}}
    ]})
}

/// One transaction that replaces the table, whatever is there now, with
/// one claiming exactly `claims`. The kernel applies it whole or not at
/// all, so no packet ever sees half a table.
pub fn rebuild(claims: &Claims) -> Value {
    let table = json!({"family": "inet", "name": TABLE});
    let mut cmds = vec![
        // `add` first, so that `delete` works when there is no table yet.
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": table}}),
    ];
    for (name, _, family, at) in SETS {
        let elems: Vec<Value> = claims
            .iter()
            .filter(|k| set_of(k) == Some(name))
            .map(element)
            .collect();
        let mut set = json!({"family": "inet", "table": TABLE, "name": name,
            "type": set_type(family, at)});
        if !elems.is_empty() {
            set["elem"] = Value::Array(elems);
        }
        cmds.push(json!({"add": {"set": set}}));
    }
    cmds.push(json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "claim"}}}));
    for (name, proto, family, at) in SETS {
        cmds.push(json!({"add": {"rule": claim_rule(name, proto, family, at)}}));
    }
    for (name, hook) in HOOKS {
        cmds.push(
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": name,
            "type": "nat", "hook": hook, "prio": PRIORITY, "policy": "accept"}}}),
        );
        cmds.push(json!({"add": {"rule": jump_rule(name)}}));
    }
    json!({"nftables": cmds})
}

/// One transaction that turns a table claiming `from` into one claiming
/// `to`; `None` if nothing changes.
pub fn change(from: &Claims, to: &Claims) -> Option<Value> {
    let mut cmds = Vec::new();
    let mut edit = |verb: &str, keys: Vec<&MappingKey>| {
        for (name, _, _, _) in SETS {
            let elems: Vec<Value> = keys
                .iter()
                .filter(|k| set_of(k) == Some(name))
                .map(|k| element(k))
                .collect();
            if !elems.is_empty() {
                cmds.push(json!({verb: {"element": {"family": "inet", "table": TABLE,
                    "name": name, "elem": elems}}}));
            }
        }
    };
    edit("delete", from.difference(to).collect());
    edit("add", to.difference(from).collect());
    (!cmds.is_empty()).then(|| json!({"nftables": cmds}))
}

/// What `nft -j list table inet envoy-docker` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub claims: Claims,
    /// Every set, chain and rule of ours is there, and nothing else: a
    /// table that someone edited by hand is rebuilt.
    pub intact: bool,
}

/// Why a listing of our table does not read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error("no \"nftables\" array in nft's output")]
    NoArray,
    #[error("unexpected {0} in our table")]
    Unexpected(String),
}

/// Reads a listing of the table. Elements that do not parse are an error:
/// the table is ours, so anything odd in it means it must be rebuilt.
pub fn parse_listing(doc: &Value) -> Result<Listing, ListingError> {
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or(ListingError::NoArray)?;
    let mut claims = Claims::new();
    let (mut sets, mut chains, mut rules) = (BTreeSet::new(), BTreeSet::new(), 0usize);
    let mut hooks_ok = true;
    for item in items {
        if let Some(set) = item.get("set") {
            let name = set.get("name").and_then(Value::as_str).unwrap_or("");
            let Some(&(_, proto, _, at)) = SETS.iter().find(|s| s.0 == name) else {
                return Err(ListingError::Unexpected(format!("set {name:?}")));
            };
            sets.insert(name.to_string());
            let proto = Proto::parse(proto).expect("tcp or udp");
            for e in set
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = parse_element(e, proto, name, at).ok_or_else(|| {
                    ListingError::Unexpected(format!("element {e} in set {name}"))
                })?;
                claims.insert(key);
            }
        } else if let Some(chain) = item.get("chain") {
            let name = chain.get("name").and_then(Value::as_str).unwrap_or("");
            if let Some((_, hook)) = HOOKS.iter().find(|h| h.0 == name) {
                hooks_ok &= chain.get("hook").and_then(Value::as_str) == Some(hook)
                    && chain.get("prio").and_then(Value::as_i64) == Some(PRIORITY)
                    && chain.get("type").and_then(Value::as_str) == Some("nat");
            }
            chains.insert(name.to_string());
        } else if item.get("rule").is_some() {
            rules += 1;
        }
    }
    let intact = hooks_ok
        && sets.len() == SETS.len()
        && chains.len() == HOOKS.len() + 1
        && chains.contains("claim")
        && HOOKS.iter().all(|h| chains.contains(h.0))
        && rules == SETS.len() + HOOKS.len();
    Ok(Listing { claims, intact })
}

fn parse_element(e: &Value, proto: Proto, set: &str, at: bool) -> Option<MappingKey> {
    let (ip, port) = if at {
        let parts = e.get("concat")?.as_array()?;
        let ip: IpAddr = parts.first()?.as_str()?.parse().ok()?;
        (ip, parts.get(1)?.as_u64()?)
    } else {
        let any: IpAddr = if set.ends_with('4') {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        (any, e.as_u64()?)
    };
    let key = MappingKey {
        proto,
        host_ip: ip,
        host_port: u16::try_from(port).ok()?,
    };
    // An element in the wrong set (an IPv6 address in tcp4_at) is odd.
    (set_of(&key) == Some(set)).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: Proto, ip: &str, port: u16) -> MappingKey {
        MappingKey {
            proto,
            host_ip: ip.parse().unwrap(),
            host_port: port,
        }
    }

    fn some() -> Claims {
        [
            key(Proto::Tcp, "0.0.0.0", 8080),
            key(Proto::Tcp, "::", 8080),
            key(Proto::Udp, "0.0.0.0", 5353),
            key(Proto::Tcp, "10.1.2.3", 80),
            key(Proto::Udp, "fd00::5", 53),
        ]
        .into()
    }

    /// The listing nft gives back for what `rebuild` wrote: the same
    /// objects, with handles.
    fn listed(batch: &Value) -> Value {
        let mut out = vec![json!({"metainfo": {"json_schema_version": 1}})];
        for (i, cmd) in batch["nftables"].as_array().unwrap().iter().enumerate() {
            let Some(add) = cmd.get("add") else { continue };
            let (kind, obj) = add.as_object().unwrap().iter().next().unwrap();
            let mut obj = obj.clone();
            obj["handle"] = json!(i);
            out.push(json!({ kind.as_str(): obj }));
        }
        // The table is added twice; nft lists it once.
        out.remove(1);
        json!({ "nftables": out })
    }

    #[test]
    fn each_binding_has_its_set_and_sctp_none() {
        assert_eq!(set_of(&key(Proto::Tcp, "0.0.0.0", 1)), Some("tcp4"));
        assert_eq!(set_of(&key(Proto::Tcp, "::", 1)), Some("tcp6"));
        assert_eq!(set_of(&key(Proto::Udp, "127.0.0.1", 1)), Some("udp4_at"));
        assert_eq!(set_of(&key(Proto::Udp, "::1", 1)), Some("udp6_at"));
        assert_eq!(set_of(&key(Proto::Sctp, "0.0.0.0", 1)), None);
    }

    #[test]
    fn a_rebuild_replaces_the_table_at_minus_101_with_every_claim() {
        let b = rebuild(&some());
        let cmds = b["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert!(cmds[1].get("delete").is_some());
        let text = b.to_string();
        assert!(text.contains(r#""prio":-101"#));
        assert!(text.contains(r#""hook":"prerouting""#) && text.contains(r#""hook":"output""#));
        let set = |name: &str| {
            cmds.iter()
                .find(|c| c["add"]["set"]["name"] == name)
                .unwrap()["add"]["set"]
                .clone()
        };
        assert_eq!(set("tcp4")["elem"], json!([8080]));
        assert_eq!(set("tcp6")["elem"], json!([8080]));
        assert_eq!(set("udp4")["elem"], json!([5353]));
        assert_eq!(
            set("tcp4_at")["elem"],
            json!([{"concat": ["10.1.2.3", 80]}])
        );
        assert_eq!(set("udp6_at")["elem"], json!([{"concat": ["fd00::5", 53]}]));
        assert!(set("udp6").get("elem").is_none(), "nft refuses empty lists");
        // Specific addresses are DNATed to themselves; wildcards redirected.
        let rules: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("rule")).collect();
        assert_eq!(rules.len(), 10);
        assert!(rules[0].to_string().contains(r#""redirect":null"#));
        assert!(
            rules[0].to_string().contains(r#""right":"@tcp4""#),
            "TCP wildcards first"
        );
        assert!(rules[4].to_string().contains(
            r#""dnat":{"addr":{"payload":{"field":"daddr","protocol":"ip"}},"family":"ip"}"#
        ));
    }

    #[test]
    fn a_change_deletes_and_adds_only_what_differs() {
        let from = some();
        let mut to = from.clone();
        to.remove(&key(Proto::Tcp, "::", 8080));
        to.insert(key(Proto::Tcp, "0.0.0.0", 9090));
        let c = change(&from, &to).unwrap();
        let cmds = c["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0]["delete"]["element"]["name"], "tcp6");
        assert_eq!(cmds[0]["delete"]["element"]["elem"], json!([8080]));
        assert_eq!(cmds[1]["add"]["element"]["name"], "tcp4");
        assert_eq!(cmds[1]["add"]["element"]["elem"], json!([9090]));
        assert_eq!(change(&from, &from), None);
    }

    #[test]
    fn a_listing_of_a_rebuilt_table_reads_back_as_its_claims_and_intact() {
        let listing = parse_listing(&listed(&rebuild(&some()))).unwrap();
        assert_eq!(listing.claims, some());
        assert!(listing.intact);
        let empty = parse_listing(&listed(&rebuild(&Claims::new()))).unwrap();
        assert!(empty.claims.is_empty() && empty.intact);
    }

    #[test]
    fn an_edited_table_is_not_intact_and_odd_elements_are_errors() {
        let full = listed(&rebuild(&some()));
        // A rule deleted by hand.
        let mut fewer = full.clone();
        let items = fewer["nftables"].as_array_mut().unwrap();
        let at = items.iter().position(|i| i.get("rule").is_some()).unwrap();
        items.remove(at);
        assert!(!parse_listing(&fewer).unwrap().intact);
        // A base chain moved behind Docker's.
        let mut moved = full.clone();
        for i in moved["nftables"].as_array_mut().unwrap() {
            if i["chain"]["name"] == "prerouting" {
                i["chain"]["prio"] = json!(-100);
            }
        }
        assert!(!parse_listing(&moved).unwrap().intact);
        // An element of the wrong family, a port out of range, a foreign set.
        for (set, elem) in [
            ("tcp4_at", json!({"concat": ["fd00::1", 80]})),
            ("tcp4", json!(70000)),
            ("tcp4", json!("http")),
        ] {
            let mut odd = full.clone();
            for i in odd["nftables"].as_array_mut().unwrap() {
                if i["set"]["name"] == set {
                    i["set"]["elem"] = json!([elem.clone()]);
                }
            }
            assert!(parse_listing(&odd).is_err(), "{set} {elem}");
        }
        let mut foreign = full;
        foreign["nftables"]
            .as_array_mut()
            .unwrap()
            .push(json!({"set": {"name": "mine"}}));
        assert!(parse_listing(&foreign).is_err());
        assert!(parse_listing(&json!({"x": 1})).is_err());
    }
}
