//! Pure builders for the fleet's egress: one listener, cluster and
//! assignment per service port, so that containers on this host reach every
//! healthy instance of a service on any host at `<egress ip>:<service port>`.
//!
//! - The listener is the one a published port of the service's mode gets
//!   (`resources::listener_named`), named `egress_<port>`, so that HTTP
//!   requests are traced here and the trace context goes on to the
//!   instance's own Envoy.
//! - The cluster is an EDS cluster like a mapping's, plus outlier
//!   detection, no panic mode (an unhealthy instance gets no requests, even
//!   when most are unhealthy), and Envoy's active health check when the
//!   service's labels ask for one.
//! - The assignment puts this host's instances at priority 0 and the other
//!   hosts' at the next priority, one locality per host, each endpoint with
//!   the health the catalog gives it. Envoy spills to the next priority as
//!   local instances become unhealthy.
//! - With the mesh (`xds::mesh` says how): other hosts' instances are
//!   reached on their hosts' mesh ports over mutual TLS, one endpoint per
//!   host, and each local caller identity gets a cluster and filter chains
//!   of its own.

use super::mesh::{self, MeshEgress};
use super::resource::{Resource, Service};
use super::resources::{base_cluster, listener_named, socket_address};
use super::serving::Serving;
use super::telemetry::Telemetry;
use crate::catalog::{Check, EgressService, Endpoint as CatalogEndpoint, Health};
use crate::mapping::{sanitize, Backend, MappingKey, Proto};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    health_check, HealthCheck, HealthStatus, Locality, Metadata,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    endpoint, lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use prost::Message;
use std::net::{IpAddr, Ipv4Addr};

/// The three resources of one egress service port.
pub struct Egress {
    pub cluster: Resource,
    /// With the mesh: one more cluster per local caller identity.
    pub identity_clusters: Vec<Resource>,
    pub endpoints: Resource,
    pub listener: Resource,
}

pub fn listener_name(port: u16) -> String {
    format!("egress_{port}")
}

/// The facts the shared builders take, for an egress port: the listener's
/// address is the egress address, and the name starts its stats.
fn service(port: u16, ip: IpAddr, e: &EgressService) -> Service {
    Service {
        key: MappingKey {
            proto: Proto::Tcp,
            host_ip: ip,
            host_port: port,
        },
        backend: Backend {
            container_ip: Ipv4Addr::UNSPECIFIED.into(),
            container_port: 0,
        },
        mode: e.mode,
        name: format!("egress-{}", sanitize(&e.service)),
        service: e.service.clone(),
        environment: None,
        container: None,
        image: None,
        proxy_protocol: None,
    }
}

pub fn build(
    port: u16,
    ip: IpAddr,
    e: &EgressService,
    t: &Telemetry,
    s: &Serving,
    mesh: Option<&MeshEgress>,
) -> Egress {
    let svc = service(port, ip, e);
    let name = svc.cluster_name();
    let mut c: Cluster = base_cluster(&svc, s);
    c.outlier_detection = Some(OutlierDetection::default());
    c.common_lb_config = Some(cluster::CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 0.0 }),
        ..Default::default()
    });
    // The catalog says who is in the fleet: an instance whose key is gone
    // leaves at once. By default Envoy keeps a removed host while its
    // active health check passes, and a host whose registrar died still
    // answers on its ports (its proxies relay).
    c.ignore_health_on_host_removal = true;
    c.health_checks = e.check.iter().map(health_check).collect();
    let Some(m) = mesh else {
        return Egress {
            cluster: Resource::new(name.clone(), c, None),
            identity_clusters: Vec::new(),
            endpoints: Resource::new(name.clone(), assignment(&name, &e.endpoints, false), None),
            listener: listener_named(listener_name(port), &svc, t, s),
        };
    };
    // The clusters of every identity share the one assignment.
    if let Some(eds) = c.eds_cluster_config.as_mut() {
        eds.service_name = name.clone();
    }
    // Active health checks go to local instances only, which take the
    // default (plain) transport socket; meshed endpoints are not checked.
    let with_identity = |c: &Cluster, cluster: String, id: String| -> Cluster {
        let mut c = c.clone();
        c.name = cluster;
        c.transport_socket_matches = vec![cluster::TransportSocketMatch {
            name: "mesh".into(),
            r#match: Some(mesh::mesh_match()),
            transport_socket: Some(mesh::upstream_tls(&m.mesh, &e.service, &id)),
        }];
        c
    };
    let td = &m.mesh.trust_domain;
    let base = with_identity(&c, name.clone(), td.host(&m.host_id));
    let mut identity_clusters = Vec::new();
    let mut l = Listener::decode(
        listener_named(listener_name(port), &svc, t, s)
            .any
            .value
            .as_slice(),
    )
    .unwrap_or_default();
    for (caller, ips) in &m.callers {
        let mut isvc = svc.clone();
        isvc.name = format!("{}~{}", svc.name, sanitize(caller));
        let iname = isvc.cluster_name();
        identity_clusters.push(Resource::new(
            iname.clone(),
            with_identity(&c, iname, td.service(caller)),
            None,
        ));
        let il = Listener::decode(
            listener_named(listener_name(port), &isvc, t, s)
                .any
                .value
                .as_slice(),
        )
        .unwrap_or_default();
        for mut chain in il.filter_chains.into_iter().chain(il.default_filter_chain) {
            chain
                .filter_chain_match
                .get_or_insert_with(Default::default)
                .source_prefix_ranges = mesh::sources(ips);
            chain.name = format!("caller {caller}");
            l.filter_chains.push(chain);
        }
    }
    let inputs = format!("{svc:?} {t:?} {s:?} {m:?}");
    Egress {
        cluster: Resource::new(name.clone(), base, None),
        identity_clusters,
        endpoints: Resource::new(name.clone(), assignment(&name, &e.endpoints, true), None),
        listener: Resource::from_inputs(listener_name(port), l, Some(name), &inputs),
    }
}

fn duration(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn health_check(c: &Check) -> HealthCheck {
    let checker = match &c.http_path {
        Some(path) => health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: path.clone(),
            ..Default::default()
        }),
        None => health_check::HealthChecker::TcpHealthCheck(Default::default()),
    };
    HealthCheck {
        // A check may take as long as its interval, from 1 s up to 5 s.
        timeout: Some(duration(c.interval_ms.clamp(1000, 5000))),
        interval: Some(duration(c.interval_ms)),
        // Envoy checks every 60 s a cluster that has had no traffic yet,
        // which one whose instances all failed never gets: same interval.
        no_traffic_interval: Some(duration(c.interval_ms)),
        no_traffic_healthy_interval: Some(duration(c.interval_ms)),
        unhealthy_threshold: Some(UInt32Value { value: 1 }),
        healthy_threshold: Some(UInt32Value { value: 1 }),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// With `mesh`, other hosts' endpoints that have a mesh port become that
/// port, one per host, healthy if any of its instances is, marked for the
/// mesh's transport socket, and not checked actively (the host's own
/// Envoy checks its instances).
fn assignment(cluster: &str, endpoints: &[CatalogEndpoint], mesh: bool) -> ClusterLoadAssignment {
    let mut meshed: Vec<CatalogEndpoint> = Vec::new();
    let mut plain: Vec<&CatalogEndpoint> = Vec::new();
    for e in endpoints {
        match e.mesh_port.filter(|_| mesh && e.remote) {
            Some(port) => {
                let at = std::net::SocketAddr::new(e.address.ip(), port);
                match meshed.iter_mut().find(|m| m.host_id == e.host_id) {
                    Some(m) => m.health = m.health.min(e.health),
                    None => meshed.push(CatalogEndpoint {
                        address: at,
                        check_port: None,
                        ..e.clone()
                    }),
                }
            }
            None => plain.push(e),
        }
    }
    let endpoints: Vec<(&CatalogEndpoint, bool)> = plain
        .into_iter()
        .map(|e| (e, false))
        .chain(meshed.iter().map(|e| (e, true)))
        .collect();
    let any_local = endpoints.iter().any(|(e, _)| !e.remote);
    // One locality per host; endpoints arrive sorted, local first.
    let mut groups: Vec<LocalityLbEndpoints> = Vec::new();
    for (e, meshed) in endpoints {
        let priority = u32::from(e.remote && any_local);
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(e.address.ip(), e.address.port())),
                health_check_config: if meshed {
                    Some(endpoint::HealthCheckConfig {
                        disable_active_health_check: true,
                        ..Default::default()
                    })
                } else {
                    e.check_port.map(|port| endpoint::HealthCheckConfig {
                        port_value: port as u32,
                        ..Default::default()
                    })
                },
                ..Default::default()
            })),
            metadata: meshed.then(|| Metadata {
                filter_metadata: [(
                    "envoy.transport_socket_match".to_string(),
                    mesh::mesh_match(),
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            health_status: match e.health {
                Health::Healthy => HealthStatus::Healthy,
                Health::Starting | Health::Unhealthy => HealthStatus::Unhealthy,
            } as i32,
            ..Default::default()
        };
        match groups.iter_mut().find(|g| {
            g.priority == priority && g.locality.as_ref().is_some_and(|l| l.sub_zone == e.host_id)
        }) {
            Some(g) => g.lb_endpoints.push(lb),
            None => groups.push(LocalityLbEndpoints {
                locality: Some(Locality {
                    sub_zone: e.host_id.clone(),
                    ..Default::default()
                }),
                lb_endpoints: vec![lb],
                priority,
                ..Default::default()
            }),
        }
    }
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: groups,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Mode;

    fn ep(remote: bool, addr: &str, host: &str, health: Health) -> CatalogEndpoint {
        CatalogEndpoint {
            remote,
            address: addr.parse().unwrap(),
            health,
            host_id: host.into(),
            check_port: None,
            mesh_port: None,
        }
    }

    fn web(endpoints: Vec<CatalogEndpoint>) -> EgressService {
        EgressService {
            service: "web".into(),
            mode: Mode::Http,
            endpoints,
            check: None,
        }
    }

    fn build_web(e: &EgressService) -> Egress {
        build(
            10080,
            "172.17.0.1".parse().unwrap(),
            e,
            &Telemetry::default(),
            &Serving::default(),
            None,
        )
    }

    #[test]
    fn local_instances_come_first_and_health_is_carried() {
        let e = web(vec![
            ep(false, "10.0.0.1:8080", "a", Health::Healthy),
            ep(true, "10.0.0.2:8080", "b", Health::Unhealthy),
            ep(true, "10.0.0.3:8080", "c", Health::Starting),
        ]);
        let out = build_web(&e);
        let cla = ClusterLoadAssignment::decode(out.endpoints.any.value.as_slice()).unwrap();
        let got: Vec<(u32, String, i32)> = cla
            .endpoints
            .iter()
            .map(|g| {
                (
                    g.priority,
                    g.locality.clone().unwrap().sub_zone,
                    g.lb_endpoints[0].health_status,
                )
            })
            .collect();
        let (h, u) = (HealthStatus::Healthy as i32, HealthStatus::Unhealthy as i32);
        assert_eq!(
            got,
            [(0, "a".into(), h), (1, "b".into(), u), (1, "c".into(), u)]
        );
        // With no local instance, the other hosts are the first priority.
        let remote_only = web(vec![ep(true, "10.0.0.2:8080", "b", Health::Healthy)]);
        let cla =
            ClusterLoadAssignment::decode(build_web(&remote_only).endpoints.any.value.as_slice())
                .unwrap();
        assert_eq!(cla.endpoints[0].priority, 0);
    }

    #[test]
    fn clusters_detect_outliers_never_panic_and_check_when_asked() {
        let mut e = web(vec![ep(true, "10.0.0.2:8080", "b", Health::Healthy)]);
        let c = Cluster::decode(build_web(&e).cluster.any.value.as_slice()).unwrap();
        assert!(c.outlier_detection.is_some());
        assert!(c.ignore_health_on_host_removal);
        assert_eq!(
            c.common_lb_config.unwrap().healthy_panic_threshold,
            Some(Percent { value: 0.0 })
        );
        assert!(c.health_checks.is_empty());
        e.check = Some(Check {
            http_path: Some("/health".into()),
            port: 8081,
            interval_ms: 1500,
        });
        e.endpoints[0].check_port = Some(8081);
        let out = build_web(&e);
        let c = Cluster::decode(out.cluster.any.value.as_slice()).unwrap();
        let hc = &c.health_checks[0];
        assert_eq!(hc.interval, Some(duration(1500)));
        let Some(health_check::HealthChecker::HttpHealthCheck(h)) = &hc.health_checker else {
            panic!("{hc:?}")
        };
        assert_eq!(h.path, "/health");
        let cla = ClusterLoadAssignment::decode(out.endpoints.any.value.as_slice()).unwrap();
        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) =
            &cla.endpoints[0].lb_endpoints[0].host_identifier
        else {
            panic!()
        };
        assert_eq!(ep.health_check_config.as_ref().unwrap().port_value, 8081);
    }

    #[test]
    fn the_listener_is_named_by_port_and_listens_on_the_egress_address() {
        let out = build_web(&web(vec![]));
        assert_eq!(out.listener.name, "egress_10080");
        assert_eq!(
            out.listener.cluster.as_deref(),
            Some(out.cluster.name.as_str())
        );
        let l = Listener::decode(out.listener.any.value.as_slice()).unwrap();
        assert_eq!(l.name, "egress_10080");
        let sa = format!("{:?}", l.address);
        assert!(sa.contains("172.17.0.1") && sa.contains("10080"), "{sa}");
    }

    #[test]
    fn the_listener_takes_the_services_mode() {
        let filters = |mode: Mode| -> Vec<String> {
            let mut e = web(vec![]);
            e.mode = mode;
            let l = Listener::decode(build_web(&e).listener.any.value.as_slice()).unwrap();
            l.filter_chains
                .iter()
                .chain(l.default_filter_chain.iter())
                .flat_map(|c| c.filters.iter().map(|f| f.name.clone()))
                .collect()
        };
        let hcm = "envoy.filters.network.http_connection_manager";
        let tcp = "envoy.filters.network.tcp_proxy";
        assert_eq!(filters(Mode::Tcp), [tcp]);
        assert_eq!(filters(Mode::Http), [hcm]);
        assert_eq!(filters(Mode::Auto), [hcm, tcp]);
    }

    #[test]
    fn with_the_mesh_other_hosts_are_their_mesh_port_and_callers_get_their_own_cluster() {
        use crate::mesh::TrustDomain;
        use crate::xds::mesh::Mesh;
        let mut a = ep(true, "10.0.0.2:8080", "b", Health::Unhealthy);
        a.mesh_port = Some(15443);
        let mut b = ep(true, "10.0.0.2:8081", "b", Health::Healthy);
        b.mesh_port = Some(15443);
        let e = web(vec![ep(false, "10.0.0.1:8080", "a", Health::Healthy), a, b]);
        let m = MeshEgress {
            mesh: Mesh {
                trust_domain: TrustDomain::parse("td").unwrap(),
                listen: "10.0.0.1:15443".parse().unwrap(),
                trust: crate::xds::mesh::trust_name("root"),
            },
            host_id: "a".into(),
            callers: [("frontend".to_string(), vec!["172.17.0.5".parse().unwrap()])]
                .into_iter()
                .collect(),
        };
        let out = build(
            10080,
            "172.17.0.1".parse().unwrap(),
            &e,
            &Telemetry::default(),
            &Serving::default(),
            Some(&m),
        );
        let cla = ClusterLoadAssignment::decode(out.endpoints.any.value.as_slice()).unwrap();
        // Host b's two instances are one endpoint, its mesh port, healthy
        // since one of them is, and marked for the mesh's socket.
        let remote = &cla.endpoints[1].lb_endpoints;
        assert_eq!(remote.len(), 1);
        assert_eq!(remote[0].health_status, HealthStatus::Healthy as i32);
        assert!(format!("{:?}", remote[0]).contains("15443"));
        assert!(remote[0].metadata.is_some());
        assert!(cla.endpoints[0].lb_endpoints[0].metadata.is_none());
        // The host identity's cluster and the frontend's share the
        // assignment; each carries a TLS socket for the mesh.
        assert_eq!(out.identity_clusters.len(), 1);
        for r in std::iter::once(&out.cluster).chain(&out.identity_clusters) {
            let c = Cluster::decode(r.any.value.as_slice()).unwrap();
            assert_eq!(c.eds_cluster_config.unwrap().service_name, out.cluster.name);
            assert_eq!(c.transport_socket_matches.len(), 1);
        }
        assert!(out.identity_clusters[0].name.contains("~frontend"));
        // The frontend's chains match its address; the rest are the host's.
        let l = Listener::decode(out.listener.any.value.as_slice()).unwrap();
        let by_source: Vec<_> = l
            .filter_chains
            .iter()
            .filter_map(|c| c.filter_chain_match.as_ref())
            .filter(|m| !m.source_prefix_ranges.is_empty())
            .collect();
        assert_eq!(by_source.len(), 1);
        assert_eq!(
            by_source[0].source_prefix_ranges[0].address_prefix,
            "172.17.0.5"
        );
    }
}
