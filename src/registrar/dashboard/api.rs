//! The JSON of `/api/v1/` (documented in docs/api.md), built from the
//! registry's answers and the sampler's figures by plain functions.

use super::super::keeper::Overview;
use super::super::state::journal::Event;
use super::super::state::{short_id, DashRow, Detail, DockerReach};
use super::live::{Figures, Live};
use crate::catalog::{EgressService, Instance};
use crate::mapping::MappingState;
use serde::Serialize;
use serde_json::{json, Value};
use std::net::IpAddr;

/// What the overview needs besides the registry's answer.
pub struct Host<'a> {
    pub name: &'a str,
    pub uptime_secs: u64,
    pub envoy_admin: String,
}

pub fn overview(view: &Overview, host: &Host, live: &Live) -> Value {
    let envoys: Vec<Value> = view
        .envoys
        .iter()
        .map(|e| {
            let ads = view
                .flavors
                .iter()
                .find(|(s, _)| *s == e.stream)
                .and_then(|(_, f)| *f);
            json!({ "stream": e.stream, "ads": ads, "stalled_secs": e.stalled_secs })
        })
        .collect();
    let lagging = view
        .envoys
        .iter()
        .filter(|e| e.stalled_secs.is_some())
        .count();
    let docker = match &view.docker {
        DockerReach::Unknown => {
            json!({ "reachable": null, "detail": "not heard from Docker (or --docker none)" })
        }
        DockerReach::Following => {
            json!({ "reachable": true, "detail": "following Docker's events" })
        }
        DockerReach::Unreachable(why) => json!({ "reachable": false, "detail": why }),
    };
    let fleet = view.fleet.as_ref().map(|(host_id, etcd, catalog)| {
        json!({
            "host_id": host_id,
            "etcd": super::super::fleet::describe(etcd),
            "etcd_ok": etcd.error.is_none() && etcd.seen,
            "instances": catalog.len(),
        })
    });
    let host_id = view
        .fleet
        .as_ref()
        .map_or(host.name, |(id, _, _)| id.as_str());
    let age_ms = live
        .state
        .at_ms
        .map(|at| super::super::state::journal::now_ms().saturating_sub(at));
    json!({
        "api": 1,
        "host_id": host_id,
        "version": crate::version::VERSION,
        "uptime_secs": host.uptime_secs,
        "serving": view.serving,
        "mappings": view.mappings,
        "envoys": envoys,
        "envoys_connected": view.envoys.len(),
        "envoys_lagging": lagging,
        "ports": {
            "claimed": view.ports.claimed(),
            "state": view.ports,
            "detail": view.ports.describe(),
        },
        "docker": docker,
        "fleet": fleet,
        "stats": {
            "envoy_admin": host.envoy_admin,
            "ok": live.state.ok,
            "error": live.state.error,
            "age_ms": age_ms,
        },
    })
}

/// One mapping as the list shows it. Serialized straight from borrowed
/// fields: at 2,000 mappings, once a second, building `Value` maps cost
/// several times as much.
#[derive(Serialize)]
pub struct MappingJson<'a> {
    id: String,
    proto: &'static str,
    host: String,
    backend: String,
    container_name: Option<&'a str>,
    container_id: Option<&'a str>,
    image: Option<&'a str>,
    service: &'a str,
    name: &'a str,
    mode: &'static str,
    state: &'a str,
    served_by: &'static str,
    since_ms: u64,
    error: Option<&'a str>,
    live: Option<&'a Figures>,
}

pub fn mapping<'a>(row: &'a DashRow, live: Option<&'a Figures>) -> MappingJson<'a> {
    let s = &row.status;
    MappingJson {
        id: s.mapping.key.resource_name(),
        proto: s.mapping.key.proto.as_str(),
        host: s.mapping.key.host_addr().to_string(),
        backend: s.mapping.backend.addr().to_string(),
        container_name: s.container.as_ref().map(|c| c.name.as_str()),
        container_id: s.container.as_ref().map(|c| short_id(&c.id)),
        image: row.image.as_deref(),
        service: row.service.as_deref().unwrap_or(&s.name),
        name: &s.name,
        mode: s.mode.as_str(),
        state: s.state.label(),
        served_by: s.server.as_str(),
        since_ms: row.since_ms,
        error: match &s.state {
            MappingState::Failed(e) => Some(e),
            _ => None,
        },
        live,
    }
}

#[derive(Serialize)]
pub struct MappingsJson<'a> {
    now_ms: u64,
    mappings: Vec<MappingJson<'a>>,
}

pub fn mappings<'a>(rows: &'a [DashRow], live: &'a Live) -> MappingsJson<'a> {
    MappingsJson {
        now_ms: super::super::state::journal::now_ms(),
        mappings: rows
            .iter()
            .map(|r| mapping(r, live.figures.get(&r.status.mapping.key.resource_name())))
            .collect(),
    }
}

/// What Envoy holds of one mapping, from its config dumps.
#[derive(Debug, Default)]
pub struct Held {
    pub listener: Option<Value>,
    pub cluster: Option<Value>,
    pub endpoints: Option<Value>,
    pub error: Option<String>,
}

pub fn detail(d: &Detail, live: Option<&Figures>, held: &Held) -> Value {
    json!({
        "mapping": mapping(&d.row, live),
        "labels": d.labels,
        "owner_pid": d.row.status.owner_pid,
        "envoy": {
            "listener": held.listener,
            "cluster": held.cluster,
            "endpoints": held.endpoints,
            "error": held.error,
        },
        "events": d.events,
    })
}

/// The first resource of a `/config_dump?resource=...` answer, if any.
pub fn first_config(dump: &str) -> Result<Option<Value>, serde_json::Error> {
    let v: Value = serde_json::from_str(dump)?;
    Ok(v.get("configs")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .cloned())
}

pub fn fleet(
    view: Option<&super::super::keeper::FleetView>,
    egress: &[(u16, Option<IpAddr>, EgressService)],
) -> Value {
    let Some((host_id, etcd, catalog)) = view else {
        return json!({ "enabled": false, "services": [], "egress": [] });
    };
    let mut services: std::collections::BTreeMap<&str, Vec<&Instance>> = Default::default();
    for i in catalog.values() {
        services.entry(&i.service).or_default().push(i);
    }
    let services: Vec<Value> = services
        .into_iter()
        .map(|(name, instances)| {
            let list: Vec<Value> = instances
                .iter()
                .map(|i| {
                    json!({
                        "host_id": i.host_id,
                        "address": i.address.to_string(),
                        "health": format!("{:?}", i.health),
                        "mode": i.mode.as_str(),
                        "container": i.container.name,
                        "local": &i.host_id == host_id,
                    })
                })
                .collect();
            json!({ "service": name, "instances": list })
        })
        .collect();
    let egress: Vec<Value> = egress
        .iter()
        .map(|(port, ip, e)| {
            json!({
                "service": e.service,
                "port": port,
                "listen": ip.map(|ip| std::net::SocketAddr::new(ip, *port).to_string()),
                "endpoints": e.endpoints.len(),
            })
        })
        .collect();
    json!({
        "enabled": true,
        "host_id": host_id,
        "etcd": super::super::fleet::describe(etcd),
        "etcd_ok": etcd.error.is_none() && etcd.seen,
        "services": services,
        "egress": egress,
    })
}

/// The mesh part of `/api/v1/fleet`: `null` without `--mesh`, else each
/// identity's leaf and the mesh port's calls by service and caller.
pub fn mesh(
    leaves: &[(String, super::super::state::mesh::LeafState)],
    calls: &[(String, String, super::super::metrics::MeshCounts)],
    now: std::time::SystemTime,
) -> Value {
    if leaves.is_empty() {
        return Value::Null;
    }
    let identities: Vec<Value> = leaves
        .iter()
        .map(|(id, l)| {
            let left = l.not_after.duration_since(now).map_or(0, |d| d.as_secs());
            json!({ "identity": id, "expires_in_s": left, "issued": l.issued })
        })
        .collect();
    let calls: Vec<Value> = calls
        .iter()
        .map(|(service, caller, n)| {
            json!({
                "service": service,
                "caller": caller,
                "handshakes": n.handshakes,
                "failed": n.failed,
                "denied": n.denied,
            })
        })
        .collect();
    json!({ "identities": identities, "calls": calls })
}

pub fn events(events: &[Event]) -> Value {
    json!({ "events": events })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{
        Backend, ContainerRef, Mapping, MappingKey, MappingStatus, Mode, Proto, Server,
    };

    fn row(service: Option<&str>) -> DashRow {
        let key = MappingKey {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
        };
        DashRow {
            status: MappingStatus {
                mapping: Mapping {
                    key,
                    backend: Backend {
                        container_ip: "172.17.0.2".parse().unwrap(),
                        container_port: 80,
                    },
                },
                mode: Mode::Auto,
                name: "web".into(),
                state: MappingState::Failed("bad".into()),
                server: Server::Relay,
                owner_pid: 7,
                container: Some(ContainerRef {
                    id: "4f3c2b1a0e9d8c7b6a5f".into(),
                    name: "web-1".into(),
                }),
            },
            since_ms: 5,
            service: service.map(String::from),
            image: Some("nginx".into()),
            cluster: "web_tcp_0-0-0-0_8080".into(),
        }
    }

    #[test]
    fn a_row_carries_the_raw_service_label_the_short_id_and_no_live_figures_yet() {
        let xss = "<img src=x onerror=alert(1)>";
        let r = row(Some(xss));
        let v = serde_json::to_value(mapping(&r, None)).unwrap();
        assert_eq!(v["service"], xss, "the label as the container has it");
        assert_eq!(v["name"], "web");
        assert_eq!(v["container_id"], "4f3c2b1a0e9d");
        assert_eq!(v["id"], "tcp_0-0-0-0_8080");
        assert_eq!(v["served_by"], "relay");
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "bad");
        assert!(v["live"].is_null());
        let r = row(None);
        assert_eq!(
            serde_json::to_value(mapping(&r, None)).unwrap()["service"],
            "web"
        );
    }

    #[test]
    fn the_first_config_of_a_dump_is_taken_and_bad_json_is_an_error() {
        let dump = r#"{"configs":[{"name":"a"},{"name":"b"}]}"#;
        assert_eq!(first_config(dump).unwrap().unwrap()["name"], "a");
        assert_eq!(first_config("{}").unwrap(), None);
        assert!(first_config("not json").is_err());
    }

    #[test]
    fn the_mesh_shows_leaves_and_calls_or_nothing() {
        use super::super::super::metrics::MeshCounts;
        use super::super::super::state::mesh::LeafState;
        let now = std::time::SystemTime::now();
        assert_eq!(mesh(&[], &[], now), Value::Null);
        let leaf = LeafState {
            not_after: now + std::time::Duration::from_secs(90),
            issued: 2,
        };
        let counts = MeshCounts {
            handshakes: 5,
            failed: 1,
            denied: 2,
        };
        let v = mesh(
            &[("spiffe://td/svc/web".into(), leaf)],
            &[("web".into(), "spiffe://td/host/c".into(), counts)],
            now,
        );
        assert_eq!(v["identities"][0]["expires_in_s"], 90);
        assert_eq!(v["identities"][0]["issued"], 2);
        assert_eq!(v["calls"][0]["caller"], "spiffe://td/host/c");
        assert_eq!(v["calls"][0]["denied"], 2);
    }

    #[test]
    fn without_a_fleet_the_fleet_says_so() {
        let v = fleet(None, &[]);
        assert_eq!(v["enabled"], false);
        assert_eq!(v["services"].as_array().unwrap().len(), 0);
    }
}
