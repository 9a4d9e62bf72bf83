//! What the registrar knows about a container, read from Docker's JSON, and
//! the names and mode that follow from its labels. Pure code: Docker's
//! answers come in as `serde_json::Value` and anything malformed is skipped
//! with a reason, never a panic.
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
//! A label whose value is not understood is reported by `label_problems`
//! and otherwise ignored, so the default applies.

use crate::mapping::{sanitize, Mode, Proto};
use crate::xds::resource::ProxyProtocol;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub const SERVICE_LABEL: &str = "ServiceName";
pub const ENVIRONMENT_LABEL: &str = "EnvironmentName";
pub const MODE_LABEL: &str = "ProxyMode";
pub const PROXY_PROTOCOL_LABEL: &str = "ProxyProtocol";
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

/// One container as far as the registrar cares.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            } else if key == PROXY_PROTOCOL_LABEL && ProxyProtocol::parse(value).is_none() {
                out.push(format!(
                    "label {key}={value:?} is not v1 or v2; no PROXY header is sent"
                ));
            }
        }
        out
    }

    /// True if this container is the backend of a mapping to `ip:port`.
    pub fn serves(&self, ip: IpAddr, port: u16, proto: Proto) -> bool {
        self.ips.contains(&ip) && (self.ports.is_empty() || self.ports.contains(&(port, proto)))
    }
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn ip_of(v: &Value) -> Option<IpAddr> {
    // Network inspect gives "172.17.0.2/16"; container inspect gives bare IPs.
    let s = v.as_str()?;
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
pub fn from_list_item(v: &Value) -> Result<ContainerMeta, String> {
    let id = v["Id"].as_str().ok_or("container without Id")?.to_string();
    let name = v["Names"]
        .as_array()
        .and_then(|n| n.first())
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim_start_matches('/')
        .to_string();
    Ok(ContainerMeta {
        name: name_or_short_id(name, &id),
        id,
        image: v["Image"].as_str().unwrap_or("").to_string(),
        labels: labels_of(&v["Labels"]),
        ips: Vec::new(),
        ports: Vec::new(),
    })
}

/// `GET /containers/{id}/json`.
pub fn from_inspect(v: &Value) -> Result<ContainerMeta, String> {
    let id = v["Id"].as_str().ok_or("inspect without Id")?.to_string();
    let name = v["Name"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches('/')
        .to_string();
    let mut ips = Vec::new();
    if let Some(nets) = v["NetworkSettings"]["Networks"].as_object() {
        for net in nets.values() {
            for key in ["IPAddress", "GlobalIPv6Address"] {
                if let Some(ip) = ip_of(&net[key]) {
                    ips.push(ip);
                }
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(p) = v["NetworkSettings"]["Ports"].as_object() {
        for key in p.keys() {
            let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
            if let (Ok(port), Some(proto)) = (port.parse(), Proto::parse(proto)) {
                ports.push((port, proto));
            }
        }
    }
    Ok(ContainerMeta {
        name: name_or_short_id(name, &id),
        id,
        image: v["Config"]["Image"].as_str().unwrap_or("").to_string(),
        labels: labels_of(&v["Config"]["Labels"]),
        ips,
        ports,
    })
}

/// `GET /networks/{id}`: the container that has `ip` on this network.
pub fn container_with_ip(network: &Value, ip: IpAddr) -> Option<String> {
    let containers = network["Containers"].as_object()?;
    containers.iter().find_map(|(id, c)| {
        let hit = ["IPv4Address", "IPv6Address"]
            .iter()
            .any(|k| ip_of(&c[*k]) == Some(ip));
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
    use serde_json::json;

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
            ports: vec![],
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
