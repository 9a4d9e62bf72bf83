//! The parts of Docker Engine API answers that the registrar reads, as
//! serde structs. Every field has a default, and a `null` reads as the
//! default, so that an answer missing what we do not need still parses;
//! what we do need (an id) is checked where it is used.
//!
//! The client asks for API version [`PINNED`] or the daemon's own, if
//! older (see `client::Docker::version`): every field here has the same
//! shape from 1.41 (Docker 20.10) to 1.47 (Docker 27 and later), and
//! Docker 29 accepts no version under 1.44.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// The newest API version these structs were written against.
pub const PINNED: (u32, u32) = (1, 47);

/// A `null` (or a missing field) as the type's default.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Labels: string values only; others are dropped.
fn labels<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    let raw: BTreeMap<String, serde_json::Value> = lenient(d)?;
    Ok(raw
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
        .collect())
}

/// Port bindings, one port at a time: one that does not parse loses its
/// bindings, not the whole answer.
fn bindings<'de, D>(d: D) -> Result<BTreeMap<String, Option<Vec<PortBinding>>>, D::Error>
where
    D: Deserializer<'de>,
{
    let raw: BTreeMap<String, serde_json::Value> = lenient(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_value(v).ok().flatten()))
        .collect())
}

/// `GET /version`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    #[serde(default, deserialize_with = "lenient")]
    pub api_version: String,
}

/// One item of `GET /networks`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSummary {
    #[serde(default, deserialize_with = "lenient")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient")]
    pub driver: String,
}

/// `GET /networks/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    /// Members by container id.
    #[serde(default, deserialize_with = "lenient")]
    pub containers: BTreeMap<String, NetworkMember>,
    #[serde(default, deserialize_with = "lenient", rename = "IPAM")]
    pub ipam: Ipam,
    #[serde(default, deserialize_with = "labels")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct NetworkMember {
    /// With its prefix length: "172.17.0.2/16".
    #[serde(default, deserialize_with = "lenient", rename = "IPv4Address")]
    pub ipv4_address: String,
    #[serde(default, deserialize_with = "lenient", rename = "IPv6Address")]
    pub ipv6_address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipam {
    #[serde(default, deserialize_with = "lenient")]
    pub config: Vec<IpamConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    #[serde(default, deserialize_with = "lenient")]
    pub gateway: String,
}

/// One item of `GET /containers/json`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    #[serde(default, deserialize_with = "lenient")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient")]
    pub names: Vec<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub image: String,
    #[serde(default, deserialize_with = "labels")]
    pub labels: BTreeMap<String, String>,
    /// "Up 3 minutes (healthy)".
    #[serde(default, deserialize_with = "lenient")]
    pub status: String,
    #[serde(default, deserialize_with = "lenient")]
    pub ports: Vec<PortSummary>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortSummary {
    #[serde(default, deserialize_with = "lenient")]
    pub private_port: u16,
    #[serde(default, deserialize_with = "lenient")]
    pub public_port: Option<u16>,
    #[serde(default, deserialize_with = "lenient", rename = "Type")]
    pub kind: String,
}

/// `GET /containers/{id}/json`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInspect {
    #[serde(default, deserialize_with = "lenient")]
    pub id: String,
    /// "/name".
    #[serde(default, deserialize_with = "lenient")]
    pub name: String,
    #[serde(default, deserialize_with = "lenient")]
    pub config: ContainerConfig,
    #[serde(default, deserialize_with = "lenient")]
    pub network_settings: NetworkSettings,
    #[serde(default, deserialize_with = "lenient")]
    pub state: ContainerState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, deserialize_with = "lenient")]
    pub image: String,
    #[serde(default, deserialize_with = "labels")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    #[serde(default, deserialize_with = "lenient")]
    pub networks: BTreeMap<String, EndpointSettings>,
    /// "80/tcp" to its host bindings (`None` when exposed, not published,
    /// or when the bindings do not parse: the port itself still counts).
    #[serde(default, deserialize_with = "bindings")]
    pub ports: BTreeMap<String, Option<Vec<PortBinding>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EndpointSettings {
    #[serde(default, deserialize_with = "lenient", rename = "IPAddress")]
    pub ip_address: String,
    #[serde(default, deserialize_with = "lenient", rename = "GlobalIPv6Address")]
    pub global_ipv6_address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    #[serde(default, deserialize_with = "lenient")]
    pub host_port: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    #[serde(default, deserialize_with = "lenient")]
    pub health: Option<HealthState>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthState {
    #[serde(default, deserialize_with = "lenient")]
    pub status: String,
}

/// One line of `GET /events`.
#[derive(Debug, Default, Deserialize)]
pub struct Event {
    #[serde(default, deserialize_with = "lenient", rename = "Action")]
    pub action: String,
    #[serde(default, deserialize_with = "lenient", rename = "Actor")]
    pub actor: Actor,
    /// The old form of `Action` and `Actor.ID`, which 20.10 still sends.
    #[serde(default, deserialize_with = "lenient")]
    pub status: String,
    #[serde(default, deserialize_with = "lenient")]
    pub id: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct Actor {
    #[serde(default, deserialize_with = "lenient", rename = "ID")]
    pub id: String,
}

impl Event {
    pub fn action(&self) -> &str {
        if self.action.is_empty() {
            &self.status
        } else {
            &self.action
        }
    }

    /// The container's id, if the event names one.
    pub fn container(&self) -> Option<&str> {
        [&self.actor.id, &self.id]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nulls_and_missing_fields_read_as_defaults() {
        let c: ContainerSummary = serde_json::from_value(json!({
            "Id": "abc", "Names": null, "Labels": {"a": "1", "n": 5}, "Ports": null
        }))
        .unwrap();
        assert_eq!(c.id, "abc");
        assert!(c.names.is_empty() && c.ports.is_empty());
        assert_eq!(c.labels.len(), 1);
        let i: ContainerInspect = serde_json::from_value(json!({
            "Id": "abc", "NetworkSettings": {"Ports": {"80/tcp": null}}, "State": {"Health": null}
        }))
        .unwrap();
        assert!(i.network_settings.ports["80/tcp"].is_none());
        assert!(i.state.health.is_none());
        let e: Event = serde_json::from_value(json!({"status": "die", "id": "x"})).unwrap();
        assert_eq!((e.action(), e.container()), ("die", Some("x")));
        let e: Event =
            serde_json::from_value(json!({"Action": "start", "Actor": {"ID": "y"}})).unwrap();
        assert_eq!((e.action(), e.container()), ("start", Some("y")));
        // A field of the wrong type is an error, not a panic.
        assert!(serde_json::from_value::<ContainerSummary>(json!({"Id": 5})).is_err());
    }
}
