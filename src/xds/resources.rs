//! Pure functions from one TCP mapping to the Envoy resources that serve it:
//! a Listener on the host address, an EDS Cluster, and its
//! ClusterLoadAssignment with the container's address.
//!
//! Every resource carries a version that is a hash of its encoded bytes, so
//! the same state always gives the same versions, also after a restart.

use super::resource::{Resource, Service};
use super::telemetry::{self, Telemetry};
use crate::mapping::Mode;
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Decorator, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration};
use envoy_types::util::pack_any;

fn socket_address(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub fn cluster(svc: &Service) -> Resource {
    let name = svc.cluster_name();
    let c = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    };
    Resource::new(name, c, None)
}

pub fn endpoints(svc: &Service) -> Resource {
    let name = svc.cluster_name();
    let cla = ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(
                        svc.backend.container_ip,
                        svc.backend.container_port,
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(name, cla, None)
}

/// An assignment with no endpoints, for a cluster that is going away.
pub fn no_endpoints(cluster: &str) -> Resource {
    let cla = ClusterLoadAssignment {
        cluster_name: cluster.into(),
        ..Default::default()
    };
    Resource::new(cluster.into(), cla, None)
}

pub fn listener(svc: &Service, t: &Telemetry) -> Resource {
    let name = svc.listener_name();
    let cluster = svc.cluster_name();
    let filter = match svc.mode {
        Mode::Http => Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(http_manager(svc, t))),
        },
        Mode::Tcp => Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
                stat_prefix: cluster.clone(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.clone())),
                access_log: telemetry::access_logs(t, svc, false),
                ..Default::default()
            }))),
        },
    };
    let l = Listener {
        name: name.clone(),
        // For `::`, Envoy sets IPV6_V6ONLY (ipv4_compat is off), so the
        // `0.0.0.0` listener of the same port can coexist.
        address: Some(socket_address(svc.key.host_ip, svc.key.host_port)),
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    };
    // The backend lives in the assignment, not here: a container that
    // comes back on a new address must not make Envoy rebuild (and drain)
    // its listener.
    let mut inputs_of = svc.clone();
    inputs_of.backend.container_ip = std::net::Ipv4Addr::UNSPECIFIED.into();
    inputs_of.backend.container_port = 0;
    let inputs = format!("{inputs_of:?} {t:?}");
    Resource::from_inputs(name, l, Some(cluster), &inputs)
}

fn http_manager(svc: &Service, t: &Telemetry) -> Any {
    let cluster = svc.cluster_name();
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.clone())),
            // Zero turns the route timeout off: long requests and streams
            // must not be cut at Envoy's default of 15 s.
            timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })),
        // Spans are named after the service.
        decorator: t.tracer.map(|_| Decorator {
            operation: svc.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: cluster.clone(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: cluster.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: cluster,
                    domains: vec!["*".into()],
                    routes: vec![route],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            // No x-envoy-* headers added to requests or answers: less work
            // per request, and nothing docker-proxy would not pass as is.
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router {
                suppress_envoy_headers: true,
                ..Default::default()
            }))),
            ..Default::default()
        }],
        // A request id is only of use to tracing and to access logs (which
        // show it); making one costs a random UUID and a header per request.
        generate_request_id: Some(BoolValue {
            value: t.tracer.is_some() || t.access_log.is_some(),
        }),
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        tracing: telemetry::tracing(t, svc),
        access_log: telemetry::access_logs(t, svc, true),
        ..Default::default()
    };
    pack_any(hcm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Backend, MappingKey, Proto};
    use prost::Message;

    const T: Telemetry = Telemetry {
        tracer: None,
        sampling: 100.0,
        access_log: None,
    };

    fn svc(ip: &str, mode: Mode) -> Service {
        Service {
            key: MappingKey {
                proto: Proto::Tcp,
                host_ip: ip.parse().unwrap(),
                host_port: 8080,
            },
            backend: Backend {
                container_ip: "172.17.0.2".parse().unwrap(),
                container_port: 80,
            },
            mode,
            name: "web-prod".into(),
            service: "web".into(),
            environment: Some("prod".into()),
            container: Some("web1".into()),
            image: Some("busybox".into()),
        }
    }

    #[test]
    fn names_carry_the_service_and_stay_unique_per_family() {
        let v4 = svc("0.0.0.0", Mode::Http);
        let v6 = svc("::", Mode::Http);
        assert_eq!(v4.cluster_name(), "web-prod_tcp_0-0-0-0_8080");
        assert_ne!(v4.cluster_name(), v6.cluster_name());
        assert_ne!(listener(&v4, &T).name, listener(&v6, &T).name);
        assert_eq!(
            listener(&v4, &T).cluster.as_deref(),
            Some("web-prod_tcp_0-0-0-0_8080")
        );
    }

    #[test]
    fn versions_are_deterministic_and_follow_content() {
        let a = svc("0.0.0.0", Mode::Http);
        assert_eq!(listener(&a, &T).version, listener(&a, &T).version);
        assert_ne!(
            listener(&a, &T).version,
            listener(&svc("0.0.0.0", Mode::Tcp), &T).version
        );
        let mut moved = a.clone();
        moved.backend.container_ip = "172.17.0.9".parse().unwrap();
        assert_eq!(cluster(&a).version, cluster(&moved).version);
        assert_eq!(listener(&a, &T).version, listener(&moved, &T).version);
        assert_ne!(endpoints(&a).version, endpoints(&moved).version);
    }

    #[test]
    fn http_mode_routes_everything_with_no_timeout_and_tcp_mode_proxies() {
        let l =
            Listener::decode(listener(&svc("::", Mode::Http), &T).any.value.as_slice()).unwrap();
        let f = &l.filter_chains[0].filters[0];
        assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!()
        };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        // No per-request work that nothing uses: no request id without
        // tracing or access logs, no x-envoy-* headers.
        assert_eq!(hcm.generate_request_id, Some(BoolValue { value: false }));
        let Some(http_filter::ConfigType::TypedConfig(router)) = &hcm.http_filters[0].config_type
        else {
            panic!()
        };
        assert!(
            Router::decode(router.value.as_slice())
                .unwrap()
                .suppress_envoy_headers
        );
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier
        else {
            panic!()
        };
        let Some(route::Action::Route(ra)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(
            ra.timeout,
            Some(Duration {
                seconds: 0,
                nanos: 0
            })
        );
        let addr = l.address.unwrap();
        let Some(address::Address::SocketAddress(sa)) = addr.address else {
            panic!()
        };
        assert_eq!(sa.address, "::");
        assert!(!sa.ipv4_compat);

        let l = Listener::decode(
            listener(&svc("0.0.0.0", Mode::Tcp), &T)
                .any
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(
            l.filter_chains[0].filters[0].name,
            "envoy.filters.network.tcp_proxy"
        );
    }
}
