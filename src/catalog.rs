//! The fleet catalog's records: how one published
//! instance of a service is written to etcd, and how what the catalog holds
//! merges with this host's own state into the egress services Envoy gets.
//! Pure code: `registrar::fleet` moves these through etcd.
//!
//! - Key: `/envoy-docker/v1/instances/<service>/<host-id>/<listener>`, one
//!   per published TCP mapping of a named service. Each part is one path
//!   segment: non-empty, no `/`, not `.` or `..`.
//! - Value: JSON (`Instance`), so that operators can read it with
//!   `etcdctl get --prefix`.
//! - Merge: this host's instances come from its own state, never from the
//!   catalog's copy of them, which may be stale while etcd is unreachable.
//!   Other hosts' instances come from the catalog. Only instances with a
//!   service port are offered fleet-wide; endpoints are sorted so that the
//!   resources built from them, and their versions, are stable.

use crate::mapping::Mode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

pub const PREFIX: &str = "/envoy-docker/v1/instances/";

/// An instance's health as Docker or a health check reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Docker's HEALTHCHECK has not passed yet.
    Starting,
    Unhealthy,
}

impl Health {
    /// Whether new requests may go to it.
    pub fn routable(self) -> bool {
        self == Health::Healthy
    }
}

/// An active health check that Envoys run against an instance (from the
/// container's `HealthCheck` labels).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Check {
    /// `GET` this path and want a 2xx; `None` checks that a TCP connection
    /// opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// The port checked, at the instance's advertised address.
    pub port: u16,
    pub interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub name: String,
    pub id: String,
}

/// One published instance of a service, as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub host_id: String,
    /// Where other hosts reach it: the advertised address and host port.
    pub address: SocketAddr,
    pub mode: Mode,
    pub container: ContainerInfo,
    #[serde(default)]
    pub image: String,
    pub health: Health,
    /// The fleet-wide port (`ServicePort_<containerport>`), if offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// The host's mesh port (`serve --mesh`): where other hosts' callers
    /// reach this instance over mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_port: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{what} {value:?} cannot be one segment of a catalog key")]
    BadSegment { what: &'static str, value: String },
    #[error("{0:?} is not a catalog instance key")]
    NotAKey(String),
    #[error("catalog value is not an instance: {0}")]
    BadValue(String),
}

fn segment(what: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.contains('/') || value == "." || value == ".." {
        return Err(Error::BadSegment {
            what,
            value: value.into(),
        });
    }
    Ok(())
}

/// The key of one instance.
pub fn key(service: &str, host_id: &str, listener: &str) -> Result<String, Error> {
    segment("service", service)?;
    segment("host id", host_id)?;
    segment("listener", listener)?;
    Ok(format!("{PREFIX}{service}/{host_id}/{listener}"))
}

/// The (service, host id, listener) of a key under the prefix.
pub fn parse_key(key: &str) -> Result<(&str, &str, &str), Error> {
    let rest = key
        .strip_prefix(PREFIX)
        .ok_or_else(|| Error::NotAKey(key.into()))?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(s), Some(h), Some(l), None) if [s, h, l].iter().all(|p| segment("", p).is_ok()) => {
            Ok((s, h, l))
        }
        _ => Err(Error::NotAKey(key.into())),
    }
}

pub fn encode(i: &Instance) -> Vec<u8> {
    // Serializing these plain types cannot fail.
    serde_json::to_vec(i).unwrap_or_default()
}

/// A value read from etcd; anything else is refused with a reason.
pub fn decode(value: &[u8]) -> Result<Instance, Error> {
    serde_json::from_slice(value).map_err(|e| Error::BadValue(e.to_string()))
}

/// One instance as `status --fleet` shows it (and as the registrar's
/// socket carries it: plain fields only, for postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub service: String,
    pub host_id: String,
    pub address: String,
    pub health: String,
    pub mode: String,
    pub service_port: Option<u16>,
    pub container: String,
}

impl From<&Instance> for Row {
    fn from(i: &Instance) -> Row {
        Row {
            service: i.service.clone(),
            host_id: i.host_id.clone(),
            address: i.address.to_string(),
            health: format!("{:?}", i.health).to_lowercase(),
            mode: i.mode.as_str().into(),
            service_port: i.service_port,
            container: i.container.name.clone(),
        }
    }
}

/// One endpoint of an egress service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// False for this host's own instances, which sort first.
    pub remote: bool,
    pub address: SocketAddr,
    pub health: Health,
    pub host_id: String,
    /// Where Envoy's active health check goes, if the service has one.
    pub check_port: Option<u16>,
    /// The host's mesh port, if it is in the mesh.
    pub mesh_port: Option<u16>,
}

/// A service offered fleet-wide on one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressService {
    pub service: String,
    pub mode: Mode,
    pub endpoints: Vec<Endpoint>,
    /// The active health check, as the first instance that has one says.
    pub check: Option<Check>,
}

/// The egress services by service port, and the conflicts found on the
/// way (two services on one port, instances of one service in different
/// modes), for the log.
pub fn merge<'a>(
    catalog: impl IntoIterator<Item = &'a Instance>,
    local: &'a [Instance],
    host_id: &str,
) -> (BTreeMap<u16, EgressService>, Vec<String>) {
    let mut all: Vec<&Instance> = catalog
        .into_iter()
        .filter(|i| i.host_id != host_id)
        .chain(local.iter().filter(|i| i.host_id == host_id))
        .filter(|i| i.service_port.is_some())
        .collect();
    // A stable order, so that the first instance of a port decides.
    all.sort_by(|a, b| {
        (&a.service, &a.host_id, a.address).cmp(&(&b.service, &b.host_id, b.address))
    });
    let mut out: BTreeMap<u16, EgressService> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for i in all {
        let Some(port) = i.service_port else { continue };
        let svc = out.entry(port).or_insert_with(|| EgressService {
            service: i.service.clone(),
            mode: i.mode,
            endpoints: Vec::new(),
            check: None,
        });
        if svc.service != i.service {
            conflicts.push(format!(
                "service port {port}: {} on {} is ignored; {} has it",
                i.service, i.host_id, svc.service
            ));
            continue;
        }
        if svc.mode != i.mode {
            conflicts.push(format!(
                "service {}: {} on {} is in {} mode, the service in {}",
                i.service,
                i.address,
                i.host_id,
                i.mode.as_str(),
                svc.mode.as_str()
            ));
        }
        if svc.check.is_none() {
            svc.check = i.check.clone();
        }
        svc.endpoints.push(Endpoint {
            remote: i.host_id != host_id,
            address: i.address,
            health: i.health,
            host_id: i.host_id.clone(),
            check_port: i.check.as_ref().map(|c| c.port),
            mesh_port: i.mesh_port,
        });
    }
    for svc in out.values_mut() {
        svc.endpoints.sort();
        svc.endpoints.dedup_by(|a, b| a.address == b.address);
    }
    (out, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(service: &str, host: &str, addr: &str, port: Option<u16>) -> Instance {
        Instance {
            service: service.into(),
            environment: Some("prod".into()),
            host_id: host.into(),
            address: addr.parse().unwrap(),
            mode: Mode::Http,
            container: ContainerInfo {
                name: format!("{service}1"),
                id: "0123456789ab".into(),
            },
            image: "nginx".into(),
            health: Health::Healthy,
            service_port: port,
            mesh_port: None,
            check: None,
        }
    }

    #[test]
    fn keys_are_one_segment_per_part_and_parse_back() {
        let k = key("web", "host-a", "tcp_0-0-0-0_8080").unwrap();
        assert_eq!(k, "/envoy-docker/v1/instances/web/host-a/tcp_0-0-0-0_8080");
        assert_eq!(
            parse_key(&k).unwrap(),
            ("web", "host-a", "tcp_0-0-0-0_8080")
        );
        for (s, h, l) in [
            ("", "a", "l"),
            ("we/b", "a", "l"),
            ("web", "..", "l"),
            ("w", "a", ""),
        ] {
            assert!(key(s, h, l).is_err(), "{s:?} {h:?} {l:?}");
        }
        for bad in [
            "/envoy-docker/v1/instances/web/a",
            "/envoy-docker/v1/instances/web/a/l/extra",
            "/envoy-docker/v1/instances/web//l",
            "/other/web/a/l",
            "",
        ] {
            assert!(parse_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_are_json_that_round_trips_and_garbage_is_refused() {
        let i = inst("web", "a", "10.0.0.1:8080", Some(10080));
        let bytes = encode(&i);
        let text = String::from_utf8(bytes.clone()).unwrap();
        for field in [
            r#""service":"web""#,
            r#""host_id":"a""#,
            r#""address":"10.0.0.1:8080""#,
            r#""mode":"http""#,
            r#""health":"healthy""#,
            r#""service_port":10080"#,
            r#""container":{"name":"web1","id":"0123456789ab"}"#,
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert_eq!(decode(&bytes).unwrap(), i);
        for bad in [&b""[..], b"{}", b"[1]", b"\xff", br#"{"service":"web"}"#] {
            assert!(matches!(decode(bad), Err(Error::BadValue(_))), "{bad:?}");
        }
    }

    #[test]
    fn merge_takes_this_host_from_local_state_and_the_rest_from_the_catalog() {
        let mut stale_own = inst("web", "a", "10.0.0.1:9999", Some(10080));
        stale_own.health = Health::Unhealthy;
        let catalog = vec![
            inst("web", "b", "10.0.0.2:8080", Some(10080)),
            stale_own,
            inst("db", "b", "10.0.0.2:5432", None),
        ];
        let local = vec![
            inst("web", "a", "10.0.0.1:8080", Some(10080)),
            // Claimed for another host: not ours to say.
            inst("web", "c", "10.0.0.3:8080", Some(10080)),
        ];
        let (egress, conflicts) = merge(&catalog, &local, "a");
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(egress.len(), 1, "db offers no service port");
        let web = &egress[&10080];
        let got: Vec<(bool, String)> = web
            .endpoints
            .iter()
            .map(|e| (e.remote, e.address.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (false, "10.0.0.1:8080".to_string()),
                (true, "10.0.0.2:8080".to_string())
            ]
        );
        // The same inputs in another order give the same result.
        let (again, _) = merge(catalog.iter().rev(), &local, "a");
        assert_eq!(again, egress);
    }

    #[test]
    fn conflicts_are_reported_and_the_first_service_keeps_the_port() {
        let catalog = vec![
            inst("web", "b", "10.0.0.2:8080", Some(10080)),
            inst("api", "b", "10.0.0.2:9090", Some(10080)),
        ];
        let (egress, conflicts) = merge(&catalog, &[], "a");
        assert_eq!(egress[&10080].service, "api");
        assert_eq!(egress[&10080].endpoints.len(), 1);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        let mut tcp_web = inst("web", "c", "10.0.0.3:8080", Some(10080));
        tcp_web.mode = Mode::Tcp;
        let (egress, conflicts) = merge(&[catalog[0].clone(), tcp_web], &[], "a");
        assert_eq!(egress[&10080].endpoints.len(), 2);
        assert!(conflicts[0].contains("tcp mode"), "{conflicts:?}");
        let mut sick = inst("web", "b", "10.0.0.2:8080", Some(80));
        sick.health = Health::Starting;
        let (egress, _) = merge(&[sick], &[], "a");
        assert!(!egress[&80].endpoints[0].health.routable());
    }
}
