//! What the registrar knows about a container, read from Docker's JSON, and
//! the names and mode that follow from its labels. Pure code: Docker's
//! answers come in as `api` structs and anything malformed is skipped with
//! a reason, never a panic.
//!
//! Labels, as the original envoy-docker-shim defined them:
//! - `ServiceName` and `EnvironmentName` name the service: the name shown
//!   in stats and traces is `<ServiceName>-<EnvironmentName>`, leaving out
//!   missing parts. Without `ServiceName`, the compose service label
//!   (`com.docker.compose.service`) is used, then the container name.
//! - `ProxyMode` is `auto`, `http` or `tcp`, for every port of the
//!   container; `ProxyMode_<containerport>` overrides it for one port.
//! - `ProxyProtocol` is `v1` or `v2`: Envoy then starts each upstream
//!   connection of the container's tcp-mode ports with a PROXY protocol
//!   header. Off by default: a backend that does not expect it breaks.
//!
//! Fleet labels (see `registrar::fleet`), as Sidecar defined them:
//! - `ServicePort_<containerport>=<serviceport>` offers the port fleet-wide
//!   on that service port; `SidecarDiscover=false` keeps the container out
//!   of the catalog.
//! - `HealthCheck=HttpGet` with `HealthCheckArgs=http://{{ host }}:{{ tcp
//!   N }}/path`, where `tcp N` is the host port that publishes container
//!   port N; or our shorter `HealthCheck=http:<path>` and `HealthCheck=tcp`,
//!   which check the instance's own port. `HealthCheckInterval=<duration>`
//!   (default 5 s). `External` and other types are reported and ignored.
//!
//! Docker's own HEALTHCHECK status comes from inspect (`State.Health`) or
//! the list's status text, and is the instance's health.
//!
//! A label whose value is not understood is reported by `label_problems`
//! and otherwise ignored, so the default applies.

use super::api;
use super::client::DockerError;
use crate::catalog::{Check, Health};
use crate::mapping::{sanitize, Mode, Proto};
use crate::xds::resource::ProxyProtocol;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A label whose value is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The text says which label and why.
    #[error("{0}")]
    Bad(String),
    /// A check URL names a container port that this container does not
    /// publish (or not yet, while it starts).
    #[error("label {CHECK_ARGS_LABEL}={url:?}: container port {port} is not published")]
    NotPublished { url: String, port: u16 },
}

pub const SERVICE_LABEL: &str = "ServiceName";
/// Who may call the service over the mesh: caller or service names, and
/// `host:<id>`, comma-separated.
pub const MESH_ALLOW_LABEL: &str = "MeshAllow";
pub const ENVIRONMENT_LABEL: &str = "EnvironmentName";
pub const MODE_LABEL: &str = "ProxyMode";
pub const PROXY_PROTOCOL_LABEL: &str = "ProxyProtocol";
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";
pub const SERVICE_PORT_LABEL: &str = "ServicePort";
pub const DISCOVER_LABEL: &str = "SidecarDiscover";
pub const CHECK_LABEL: &str = "HealthCheck";
pub const CHECK_ARGS_LABEL: &str = "HealthCheckArgs";
pub const CHECK_INTERVAL_LABEL: &str = "HealthCheckInterval";
/// How often a labelled health check runs unless `HealthCheckInterval` says.
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 5000;

/// One container as far as the registrar cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerMeta {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Its addresses on every network, IPv4 and IPv6.
    pub ips: Vec<IpAddr>,
    /// Container ports it publishes, when known (from inspect).
    pub ports: Vec<(u16, Proto)>,
    /// (container port, host port) of its published TCP ports, when known.
    pub bindings: Vec<(u16, u16)>,
    /// Docker's HEALTHCHECK status; `None` without a HEALTHCHECK.
    pub health: Option<Health>,
}

/// Names for a container's mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    /// `<service>-<environment>`, sanitized; starts stat prefixes.
    pub name: String,
    pub service: String,
    pub environment: Option<String>,
}

fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

impl ContainerMeta {
    pub fn naming(&self) -> Naming {
        let service = label(&self.labels, SERVICE_LABEL)
            .or_else(|| label(&self.labels, COMPOSE_SERVICE_LABEL))
            .unwrap_or(&self.name);
        let service = sanitize(service);
        let environment = label(&self.labels, ENVIRONMENT_LABEL).map(sanitize);
        let name = match &environment {
            Some(env) => format!("{service}-{env}"),
            None => service.clone(),
        };
        Naming {
            name,
            service,
            environment,
        }
    }

    /// Its `MeshAllow` label, if set.
    pub fn mesh_allow(&self) -> Option<&str> {
        label(&self.labels, MESH_ALLOW_LABEL)
    }

    /// The service name it gave itself (`ServiceName` or Compose's), which
    /// makes it a caller with an identity of its own in the mesh.
    pub fn own_service(&self) -> Option<String> {
        label(&self.labels, SERVICE_LABEL)
            .or_else(|| label(&self.labels, COMPOSE_SERVICE_LABEL))
            .map(sanitize)
    }

    /// The mode its labels give container port `port`: `ProxyMode_<port>`,
    /// else `ProxyMode`. `None` when neither is set or understood.
    pub fn mode_for(&self, port: u16) -> Option<Mode> {
        label(&self.labels, &format!("{MODE_LABEL}_{port}"))
            .and_then(Mode::parse)
            .or_else(|| label(&self.labels, MODE_LABEL).and_then(Mode::parse))
    }

    /// The PROXY protocol version its tcp-mode ports send upstream, if any.
    pub fn proxy_protocol(&self) -> Option<ProxyProtocol> {
        label(&self.labels, PROXY_PROTOCOL_LABEL).and_then(ProxyProtocol::parse)
    }

    /// Labels of ours whose value (or port) is not understood, as warnings.
    pub fn label_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &self.labels {
            let value = value.trim();
            if let Some(rest) = key.strip_prefix(MODE_LABEL) {
                let port_ok = match rest.strip_prefix('_') {
                    None => rest.is_empty(),
                    // As written by `mode_for`: no sign, no leading zero.
                    Some(port) => port
                        .parse::<u16>()
                        .is_ok_and(|p| p > 0 && p.to_string() == port),
                };
                if !port_ok {
                    out.push(format!(
                        "label {key}: want {MODE_LABEL} or {MODE_LABEL}_<container port>"
                    ));
                } else if Mode::parse(value).is_none() {
                    out.push(format!(
                        "label {key}={value:?} is not auto, http or tcp; the default applies"
                    ));
                }
            } else if let Some(port) = key.strip_prefix(&format!("{SERVICE_PORT_LABEL}_")) {
                let container_port = port.parse::<u16>().ok().filter(|p| *p > 0);
                if container_port.is_none()
                    || container_port.and_then(|p| self.service_port(p)).is_none()
                {
                    out.push(format!(
                        "label {key}={value:?}: want {SERVICE_PORT_LABEL}_<container port>=<service port>; \
                         not offered fleet-wide"
                    ));
                }
            } else if key == CHECK_LABEL {
                match self.check(0, 0) {
                    // A port the template names may be published later.
                    Err(LabelError::NotPublished { .. }) => {}
                    Err(e) => out.push(e.to_string()),
                    _ => {}
                }
            } else if key == PROXY_PROTOCOL_LABEL && ProxyProtocol::parse(value).is_none() {
                out.push(format!(
                    "label {key}={value:?} is not v1 or v2; no PROXY header is sent"
                ));
            }
        }
        out
    }

    /// The fleet-wide service port of container port `port`, if offered.
    pub fn service_port(&self, port: u16) -> Option<u16> {
        label(&self.labels, &format!("{SERVICE_PORT_LABEL}_{port}"))
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|p| *p > 0)
    }

    /// False with `SidecarDiscover=false`: kept out of the catalog.
    pub fn discoverable(&self) -> bool {
        !label(&self.labels, DISCOVER_LABEL).is_some_and(|v| v.eq_ignore_ascii_case("false"))
    }

    /// The active health check its labels ask for, for the mapping of
    /// `container_port` published on `host_port`. `Err` explains a label
    /// that is not understood (logged, and then no check is run).
    pub fn check(&self, container_port: u16, host_port: u16) -> Result<Option<Check>, LabelError> {
        let Some(kind) = label(&self.labels, CHECK_LABEL) else {
            return Ok(None);
        };
        let interval_ms = match label(&self.labels, CHECK_INTERVAL_LABEL) {
            None => DEFAULT_CHECK_INTERVAL_MS,
            Some(v) => crate::xds::serving::parse_duration(v)
                .ok()
                .flatten()
                .map(|d| d.as_millis().clamp(100, 3_600_000) as u64)
                .ok_or_else(|| {
                    LabelError::Bad(format!(
                        "label {CHECK_INTERVAL_LABEL}={v:?} is not a duration"
                    ))
                })?,
        };
        let (http_path, port) = if kind.eq_ignore_ascii_case("HttpGet") {
            let args = label(&self.labels, CHECK_ARGS_LABEL).ok_or_else(|| {
                LabelError::Bad(format!("{CHECK_LABEL}=HttpGet needs {CHECK_ARGS_LABEL}"))
            })?;
            let (port, path) = self.resolve_url(args, container_port, host_port)?;
            (Some(path), port)
        } else if kind.eq_ignore_ascii_case("tcp") {
            (None, host_port)
        } else if let Some(path) = kind.strip_prefix("http:") {
            if !path.starts_with('/') {
                return Err(LabelError::Bad(format!(
                    "label {CHECK_LABEL}={kind:?}: the path must start with /"
                )));
            }
            (Some(path.to_string()), host_port)
        } else {
            return Err(LabelError::Bad(format!(
                "label {CHECK_LABEL}={kind:?} is not a check envoy-docker runs \
                 (HttpGet, http:<path> or tcp); no check"
            )));
        };
        Ok(Some(Check {
            http_path,
            port,
            interval_ms,
        }))
    }

    /// Sidecar's `HealthCheckArgs` URL: `{{ host }}` stands for the
    /// instance's address and `{{ tcp N }}` for the host port publishing
    /// container port N. Gives (port, path).
    fn resolve_url(
        &self,
        url: &str,
        own: u16,
        host_port: u16,
    ) -> Result<(u16, String), LabelError> {
        let bad = |why: &str| LabelError::Bad(format!("label {CHECK_ARGS_LABEL}={url:?}: {why}"));
        let mut out = String::new();
        let mut rest = url;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").ok_or_else(|| bad("unclosed {{"))? + start;
            let words: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
            match words.as_slice() {
                ["host"] => out.push_str("host"),
                ["tcp", n] => {
                    let n: u16 = n.parse().map_err(|_| bad("tcp wants a port"))?;
                    let bound = self.bindings.iter().find(|(c, _)| *c == n).map(|b| b.1);
                    let hp = bound.or((n == own).then_some(host_port)).ok_or_else(|| {
                        LabelError::NotPublished {
                            url: url.to_string(),
                            port: n,
                        }
                    })?;
                    out.push_str(&hp.to_string());
                }
                _ => return Err(bad("only {{ host }} and {{ tcp N }} are understood")),
            }
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        let after = out
            .strip_prefix("http://")
            .ok_or_else(|| bad("want http://"))?;
        let (authority, path) = after.split_at(after.find('/').unwrap_or(after.len()));
        let port = match authority.rsplit_once(':') {
            Some((_, p)) => p.parse().map_err(|_| bad("bad port"))?,
            None => 80,
        };
        let path = if path.is_empty() { "/" } else { path };
        Ok((port, path.to_string()))
    }

    /// True if this container is the backend of a mapping to `ip:port`.
    pub fn serves(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.ips.contains(&ip) && (self.ports.is_empty() || self.ports.contains(&(port, proto)))
    }
}

fn ip_of(s: &str) -> Option<IpAddr> {
    // Network inspect gives "172.17.0.2/16"; container inspect gives bare IPs.
    let bare = s.split('/').next()?;
    bare.parse().ok()
}

/// Docker always names containers, but an answer without a name still gets
/// one: the short id, as `docker ps` shows it.
fn name_or_short_id(name: String, id: &str) -> String {
    if name.is_empty() {
        // By characters: an id from a broken or hostile API may not be ASCII.
        id.chars().take(12).collect()
    } else {
        name
    }
}

/// One item of `GET /containers/json`. Its addresses are left empty: while
/// a container starts they are still blank there.
pub fn from_list_item(v: &api::ContainerSummary) -> Result<ContainerMeta, DockerError> {
    if v.id.is_empty() {
        return Err(DockerError::Missing("a container's Id"));
    }
    let id = v.id.clone();
    let name = v
        .names
        .first()
        .map_or("", |n| n.trim_start_matches('/'))
        .to_string();
    // The list shows health only in its status text: "Up 3 minutes
    // (healthy)", "(unhealthy)" or "(health: starting)".
    let health = v
        .status
        .rsplit_once('(')
        .and_then(|(_, h)| h.strip_suffix(')'))
        .map(|h| h.trim_start_matches("health: "))
        .and_then(health_of);
    let bindings = v
        .ports
        .iter()
        .filter(|p| p.kind == "tcp")
        .filter_map(|p| Some((p.private_port, p.public_port?)))
        .collect();
    Ok(ContainerMeta {
        name: name_or_short_id(name, &id),
        id,
        image: v.image.clone(),
        labels: v.labels.clone(),
        ips: Vec::new(),
        ports: Vec::new(),
        bindings,
        health,
    })
}

/// `GET /containers/{id}/json`.
pub fn from_inspect(v: &api::ContainerInspect) -> Result<ContainerMeta, DockerError> {
    if v.id.is_empty() {
        return Err(DockerError::Missing("the inspected container's Id"));
    }
    let id = v.id.clone();
    let name = v.name.trim_start_matches('/').to_string();
    let settings = &v.network_settings;
    let ips = settings
        .networks
        .values()
        .flat_map(|n| [&n.ip_address, &n.global_ipv6_address])
        .filter_map(|s| ip_of(s))
        .collect();
    let mut ports = Vec::new();
    for key in settings.ports.keys() {
        let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        if let (Ok(port), Some(proto)) = (port.parse(), Proto::parse(proto)) {
            ports.push((port, proto));
        }
    }
    let mut bindings = Vec::new();
    for (key, binds) in &settings.ports {
        let Some(port) = key.strip_suffix("/tcp").and_then(|p| p.parse().ok()) else {
            continue;
        };
        for b in binds.iter().flatten() {
            if let Ok(hp) = b.host_port.parse() {
                bindings.push((port, hp));
            }
        }
    }
    bindings.sort();
    bindings.dedup();
    Ok(ContainerMeta {
        name: name_or_short_id(name, &id),
        id,
        image: v.config.image.clone(),
        labels: v.config.labels.clone(),
        ips,
        ports,
        bindings,
        health: v.state.health.as_ref().and_then(|h| health_of(&h.status)),
    })
}

/// Docker's health words; "none" and anything else mean no HEALTHCHECK.
fn health_of(s: &str) -> Option<Health> {
    match s {
        "healthy" => Some(Health::Healthy),
        "unhealthy" => Some(Health::Unhealthy),
        "starting" => Some(Health::Starting),
        _ => None,
    }
}

/// `GET /networks/{id}`: the container that has `ip` on this network.
pub fn container_with_ip(network: &api::Network, ip: IpAddr) -> Option<String> {
    network.containers.iter().find_map(|(id, c)| {
        let hit = [&c.ipv4_address, &c.ipv6_address]
            .iter()
            .any(|a| ip_of(a) == Some(ip));
        hit.then(|| id.clone())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_nameless_container_with_a_non_ascii_id_gets_a_short_id_without_panicking() {
        assert_eq!(
            super::name_or_short_id(String::new(), "ééééééééééééé"),
            "éééééééééééé"
        );
        assert_eq!(super::name_or_short_id(String::new(), "abc"), "abc");
        assert_eq!(super::name_or_short_id("web".into(), "abc"), "web");
    }

    use super::*;
    use serde_json::{json, Value};

    // The tests write Docker's answers as JSON; these read them as the
    // client does, then call the real functions.
    fn parsed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, DockerError> {
        serde_json::from_value(v.clone()).map_err(DockerError::BadEvent)
    }
    fn from_inspect(v: &Value) -> Result<ContainerMeta, DockerError> {
        super::from_inspect(&parsed(v)?)
    }
    fn from_list_item(v: &Value) -> Result<ContainerMeta, DockerError> {
        super::from_list_item(&parsed(v)?)
    }
    fn container_with_ip(v: &Value, ip: IpAddr) -> Option<String> {
        super::container_with_ip(&parsed(v).ok()?, ip)
    }

    fn meta(labels: &[(&str, &str)]) -> ContainerMeta {
        ContainerMeta {
            id: "0123456789abcdef".into(),
            name: "quirky_euler".into(),
            image: "busybox".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec!["172.17.0.2".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn fleet_labels_service_port_discovery_and_checks() {
        let m = meta(&[("ServicePort_80", "10080"), ("ServicePort_81", "x")]);
        assert_eq!(m.service_port(80), Some(10080));
        assert_eq!(m.service_port(81), None);
        assert_eq!(m.service_port(82), None);
        assert!(m.discoverable());
        assert_eq!(m.check(80, 8080), Ok(None));
        assert!(m.label_problems()[0].contains("ServicePort_81"));
        assert!(!meta(&[("SidecarDiscover", "False")]).discoverable());
        assert!(meta(&[("SidecarDiscover", "true")]).discoverable());

        let mut sidecar = meta(&[
            ("HealthCheck", "HttpGet"),
            (
                "HealthCheckArgs",
                "http://{{ host }}:{{ tcp 8081 }}/health?deep=1",
            ),
            ("HealthCheckInterval", "2s"),
        ]);
        sidecar.bindings = vec![(8081, 32001)];
        let c = sidecar.check(80, 8080).unwrap().unwrap();
        assert_eq!(
            (c.http_path.as_deref(), c.port, c.interval_ms),
            (Some("/health?deep=1"), 32001, 2000)
        );
        // The mapping's own port resolves without bindings.
        sidecar.bindings.clear();
        assert!(sidecar.check(8081, 9000).unwrap().unwrap().port == 9000);
        assert!(matches!(
            sidecar.check(80, 8080),
            Err(LabelError::NotPublished { port: 8081, .. })
        ));
        assert!(sidecar.label_problems().is_empty());

        let short = meta(&[("HealthCheck", "http:/ready")]);
        let c = short.check(80, 8080).unwrap().unwrap();
        assert_eq!(
            (c.http_path.as_deref(), c.port, c.interval_ms),
            (Some("/ready"), 8080, 5000)
        );
        let tcp = meta(&[("HealthCheck", "tcp")])
            .check(5432, 15432)
            .unwrap()
            .unwrap();
        assert_eq!((tcp.http_path, tcp.port), (None, 15432));
        for (labels, why) in [
            (vec![("HealthCheck", "External")], "not a check"),
            (vec![("HealthCheck", "HttpGet")], "needs HealthCheckArgs"),
            (
                vec![
                    ("HealthCheck", "HttpGet"),
                    ("HealthCheckArgs", "http://{{ env X }}/"),
                ],
                "only",
            ),
            (vec![("HealthCheck", "http:nope")], "must start with /"),
            (
                vec![("HealthCheck", "tcp"), ("HealthCheckInterval", "soon")],
                "not a duration",
            ),
        ] {
            let m = meta(&labels);
            assert!(
                m.check(80, 8080).unwrap_err().to_string().contains(why),
                "{labels:?}"
            );
            assert_eq!(m.label_problems().len(), 1, "{labels:?}");
        }
    }

    #[test]
    fn docker_health_from_inspect_and_from_the_list() {
        let v = json!({"Id": "abc", "Name": "/w", "Config": {"Labels": {}},
            "State": {"Health": {"Status": "unhealthy"}},
            "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"},
                {"HostIp": "::", "HostPort": "8080"}], "53/udp": null}}});
        let m = from_inspect(&v).unwrap();
        assert_eq!(m.health, Some(Health::Unhealthy));
        assert_eq!(m.bindings, [(80, 8080)]);
        let none = json!({"Id": "abc", "State": {"Health": {"Status": "none"}}});
        assert_eq!(from_inspect(&none).unwrap().health, None);
        for (status, health) in [
            ("Up 2 seconds (health: starting)", Some(Health::Starting)),
            ("Up 3 minutes (healthy)", Some(Health::Healthy)),
            ("Up 1 second", None),
        ] {
            let item = json!({"Id": "abc", "Status": status,
                "Ports": [{"PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}]});
            let m = from_list_item(&item).unwrap();
            assert_eq!(m.health, health, "{status}");
            assert_eq!(m.bindings, [(80, 8080)]);
        }
    }

    #[test]
    fn naming_follows_the_labels_and_their_fallbacks() {
        let n = meta(&[
            ("ServiceName", "web"),
            ("EnvironmentName", "prod"),
            ("ProxyMode", "tcp"),
        ])
        .naming();
        assert_eq!(n.name, "web-prod");
        let n = meta(&[
            ("com.docker.compose.service", "api"),
            ("EnvironmentName", "dev"),
        ])
        .naming();
        assert_eq!(n.name, "api-dev");
        let n = meta(&[]).naming();
        assert_eq!(n.name, "quirky_euler");
        let n = meta(&[("ServiceName", "my.svc:1"), ("ServiceName2", "x")]).naming();
        assert_eq!(n.name, "my-svc-1");
        let n = meta(&[("ServiceName", "  "), ("EnvironmentName", "")]).naming();
        assert_eq!(n.name, "quirky_euler");
    }

    #[test]
    fn modes_per_port_override_the_container_mode() {
        let m = meta(&[("ProxyMode", "http"), ("ProxyMode_5432", " TCP ")]);
        assert_eq!(m.mode_for(80), Some(Mode::Http));
        assert_eq!(m.mode_for(5432), Some(Mode::Tcp));
        assert!(m.label_problems().is_empty());
        let m = meta(&[("ProxyMode_3306", "tcp")]);
        assert_eq!((m.mode_for(80), m.mode_for(3306)), (None, Some(Mode::Tcp)));
        assert_eq!(meta(&[("ProxyMode", "auto")]).mode_for(1), Some(Mode::Auto));
        // Values not understood fall back to the next rule, with a warning.
        let m = meta(&[
            ("ProxyMode", "udp"),
            ("ProxyMode_80", "grpc"),
            ("ProxyMode_x", "tcp"),
            ("ProxyMode_0", "tcp"),
            ("ProxyMode_080", "tcp"),
            ("ProxyModeX", "tcp"),
            ("ProxyProtocol", "v3"),
        ]);
        assert_eq!((m.mode_for(80), m.mode_for(81)), (None, None));
        assert_eq!(m.proxy_protocol(), None);
        let problems = m.label_problems();
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("ProxyMode_80=\"grpc\"")));
    }

    #[test]
    fn proxy_protocol_label() {
        assert_eq!(meta(&[]).proxy_protocol(), None);
        assert_eq!(
            meta(&[("ProxyProtocol", "v2")]).proxy_protocol(),
            Some(ProxyProtocol::V2)
        );
        assert_eq!(
            meta(&[("ProxyProtocol", "V1")]).proxy_protocol(),
            Some(ProxyProtocol::V1)
        );
    }

    #[test]
    fn inspect_gives_every_network_address_and_the_ports() {
        let v = json!({
            "Id": "abc", "Name": "/web1",
            "Config": {"Image": "busybox", "Labels": {"ServiceName": "web", "n": 1}},
            "NetworkSettings": {
                "Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}], "53/udp": null, "x": 1},
                "Networks": {
                    "bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""},
                    "other": {"IPAddress": "10.1.0.5", "GlobalIPv6Address": "fd00::5"}
                }
            }
        });
        let m = from_inspect(&v).unwrap();
        assert_eq!(m.name, "web1");
        assert_eq!(m.labels.len(), 1, "non-string labels are skipped");
        assert_eq!(m.ips.len(), 3);
        assert!(m.serves("fd00::5".parse().unwrap(), 80, Proto::Tcp));
        assert!(m.serves("10.1.0.5".parse().unwrap(), 53, Proto::Udp));
        assert!(!m.serves("10.1.0.5".parse().unwrap(), 81, Proto::Tcp));
        assert!(from_inspect(&json!({"Name": "x"})).is_err());
        assert!(from_inspect(&json!("garbage")).is_err());
    }

    #[test]
    fn list_items_and_network_members() {
        let item = json!({"Id": "abcdef0123456789", "Names": ["/db"], "Image": "pg", "Labels": {"ProxyMode": "tcp"}});
        let m = from_list_item(&item).unwrap();
        assert_eq!((m.name.as_str(), m.mode_for(80)), ("db", Some(Mode::Tcp)));
        let nameless = from_list_item(&json!({"Id": "abcdef0123456789"})).unwrap();
        assert_eq!(nameless.name, "abcdef012345");
        let net = json!({"Containers": {
            "id1": {"IPv4Address": "172.17.0.2/16", "IPv6Address": ""},
            "id2": {"IPv4Address": "172.17.0.3/16", "IPv6Address": "fd00::3/64"}
        }});
        assert_eq!(
            container_with_ip(&net, "172.17.0.3".parse().unwrap()).as_deref(),
            Some("id2")
        );
        assert_eq!(
            container_with_ip(&net, "fd00::3".parse().unwrap()).as_deref(),
            Some("id2")
        );
        assert_eq!(container_with_ip(&net, "172.17.0.9".parse().unwrap()), None);
        assert_eq!(
            container_with_ip(&json!([]), "172.17.0.9".parse().unwrap()),
            None
        );
    }
}
