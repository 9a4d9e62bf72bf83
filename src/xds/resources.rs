//! Pure functions from one TCP mapping to the Envoy resources that serve it:
//! a Listener on the host address, an EDS Cluster, and its
//! ClusterLoadAssignment with the container's address.
//!
//! Every resource carries a version that is a hash of its encoded bytes, so
//! the same state always gives the same versions, also after a restart.
//!
//! What passes through docker-proxy must pass through unchanged, so the
//! listener differs from Envoy's defaults wherever those change traffic:
//! - `auto` (the default mode) puts the `http_inspector` listener filter in
//!   front: HTTP/1.x and prior-knowledge h2c go to the HTTP connection
//!   manager, everything else to tcp_proxy. A client that says nothing
//!   within the sniff timeout (a server-first protocol) goes to tcp_proxy.
//! - The HTTP connection manager accepts HTTP/1.0, keeps header-name case
//!   both ways, passes `Server` through, proxies `100-continue`, speaks to
//!   the backend in the client's protocol (h2c and gRPC stay HTTP/2),
//!   appends the client's address to `X-Forwarded-For`, and allows request
//!   headers up to Envoy's maximum.
//! - No idle or request timeouts and no circuit breaker limits, unless the
//!   operator sets them (see `serving`).
//! - A tcp-mode cluster may start each upstream connection with a PROXY
//!   protocol header, when the container asks for it.

use super::resource::{ProxyProtocol, Resource, Service};
use super::serving::{proto_duration, Serving, MAX_HEADERS_COUNT};
use super::telemetry::{self, Telemetry};
use crate::mapping::Mode;
use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, CircuitBreakers, Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, http1_protocol_options, proxy_protocol_config, socket_address,
    transport_socket, Address, AggregatedConfigSource, ApiVersion, ConfigSource,
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions, ProxyProtocolConfig,
    RoutingPriority, SocketAddress, TransportSocket, TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Decorator, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3::PreserveCaseFormatterConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::proxy_protocol::v3::ProxyProtocolUpstreamTransport;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options as upstream_http, HttpProtocolOptions as UpstreamHttpOptions,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use envoy_types::util::pack_any;

/// What the http_inspector reports for the protocols that go to the HTTP
/// connection manager in auto mode.
const HTTP_PROTOCOLS: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];

/// The Host given to an HTTP/1.0 request that has none.
const HTTP10_DEFAULT_HOST: &str = "localhost";

/// A header Envoy adds to external requests with `use_remote_address`, and
/// which only means something to other Envoys.
const ENVOY_ONLY_REQUEST_HEADERS: [&str; 1] = ["x-envoy-external-address"];

pub(super) fn socket_address(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn uint(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// HTTP/1 options for both sides: HTTP/1.0 accepted, and header names sent
/// on in the case they arrived in.
fn http1_options() -> Http1ProtocolOptions {
    Http1ProtocolOptions {
        accept_http_10: true,
        // Envoy speaks HTTP/1.1 upstream, which needs a Host; this one goes
        // only to HTTP/1.0 requests that came without.
        default_host_for_http_10: HTTP10_DEFAULT_HOST.into(),
        header_key_format: Some(http1_protocol_options::HeaderKeyFormat {
            header_format: Some(
                http1_protocol_options::header_key_format::HeaderFormat::StatefulFormatter(
                    TypedExtensionConfig {
                        name: "envoy.http.stateful_header_formatters.preserve_case".into(),
                        typed_config: Some(pack_any(PreserveCaseFormatterConfig {
                            // The reason phrase, too, is the backend's own.
                            forward_reason_phrase: true,
                            ..Default::default()
                        })),
                    },
                ),
            ),
        }),
        ..Default::default()
    }
}

/// Options common to HTTP/1 and HTTP/2, on either side.
fn common_http_options(s: &Serving) -> HttpProtocolOptions {
    HttpProtocolOptions {
        idle_timeout: Some(proto_duration(s.idle_timeout)),
        max_headers_count: uint(MAX_HEADERS_COUNT),
        ..Default::default()
    }
}

fn proxy_protocol_socket(v: ProxyProtocol) -> TransportSocket {
    let version = match v {
        ProxyProtocol::V1 => proxy_protocol_config::Version::V1,
        ProxyProtocol::V2 => proxy_protocol_config::Version::V2,
    };
    let raw = TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            RawBuffer {},
        ))),
    };
    TransportSocket {
        name: "envoy.transport_sockets.upstream_proxy_protocol".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            ProxyProtocolUpstreamTransport {
                config: Some(ProxyProtocolConfig {
                    version: version as i32,
                    ..Default::default()
                }),
                transport_socket: Some(raw),
                ..Default::default()
            },
        ))),
    }
}

pub fn cluster(svc: &Service, s: &Serving) -> Resource {
    let c = base_cluster(svc, s);
    Resource::new(c.name.clone(), c, None)
}

/// The EDS cluster of a service, as `cluster` sends it and as the fleet's
/// egress clusters start from.
pub(super) fn base_cluster(svc: &Service, s: &Serving) -> Cluster {
    let name = svc.cluster_name();
    let limit = uint(s.max_connections.unwrap_or(u32::MAX));
    // Upstream HTTP goes out in the protocol the client used, with the
    // header case and limits of the downstream side.
    let upstream = UpstreamHttpOptions {
        common_http_protocol_options: Some(common_http_options(s)),
        upstream_protocol_options: Some(
            upstream_http::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                upstream_http::UseDownstreamHttpConfig {
                    http_protocol_options: Some(http1_options()),
                    http2_protocol_options: Some(Http2ProtocolOptions::default()),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    Cluster {
        name,
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
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                priority: RoutingPriority::Default as i32,
                max_connections: limit,
                max_pending_requests: limit,
                max_requests: limit,
                ..Default::default()
            }],
            ..Default::default()
        }),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(upstream),
        )]
        .into_iter()
        .collect(),
        transport_socket: svc.proxy_protocol.map(proxy_protocol_socket),
        ..Default::default()
    }
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

fn chain(filter: Filter) -> FilterChain {
    FilterChain {
        filters: vec![filter],
        ..Default::default()
    }
}

pub(super) fn tcp_filter(svc: &Service, t: &Telemetry, s: &Serving) -> Filter {
    let cluster = svc.cluster_name();
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
            stat_prefix: cluster.clone(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
            access_log: telemetry::access_logs(t, svc, false),
            // Zero: an idle connection (a database pool's, say) stays open
            // as long as both ends keep it, as with docker-proxy.
            idle_timeout: Some(proto_duration(s.idle_timeout)),
            ..Default::default()
        }))),
    }
}

fn http_filter(svc: &Service, t: &Telemetry, s: &Serving) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(http_manager(svc, t, s))),
    }
}

pub fn listener(svc: &Service, t: &Telemetry, s: &Serving) -> Resource {
    listener_named(svc.listener_name(), svc, t, s)
}

/// The listener of `svc` under another name (the fleet's egress listeners
/// must not clash with a mapping's).
pub(super) fn listener_named(name: String, svc: &Service, t: &Telemetry, s: &Serving) -> Resource {
    let cluster = svc.cluster_name();
    let mut l = Listener {
        name: name.clone(),
        // For `::`, Envoy sets IPV6_V6ONLY (ipv4_compat is off), so the
        // `0.0.0.0` listener of the same port can coexist.
        address: Some(socket_address(svc.key.host_ip, svc.key.host_port)),
        ..Default::default()
    };
    match svc.mode {
        Mode::Http => l.filter_chains = vec![chain(http_filter(svc, t, s))],
        Mode::Tcp => l.filter_chains = vec![chain(tcp_filter(svc, t, s))],
        Mode::Auto => {
            l.listener_filters = vec![ListenerFilter {
                name: "envoy.filters.listener.http_inspector".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                    HttpInspector {},
                ))),
                ..Default::default()
            }];
            l.listener_filters_timeout = Some(proto_duration(Some(s.sniff_timeout)));
            // A client that says nothing may be waiting for the server to
            // speak first: it goes on, to tcp_proxy, instead of being cut.
            l.continue_on_listener_filters_timeout = true;
            let mut http = chain(http_filter(svc, t, s));
            http.filter_chain_match = Some(FilterChainMatch {
                application_protocols: HTTP_PROTOCOLS.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            });
            l.filter_chains = vec![http];
            l.default_filter_chain = Some(chain(tcp_filter(svc, t, s)));
        }
    }
    // The backend lives in the assignment, not here: a container that
    // comes back on a new address must not make Envoy rebuild (and drain)
    // its listener.
    let mut inputs_of = svc.clone();
    inputs_of.backend.container_ip = std::net::Ipv4Addr::UNSPECIFIED.into();
    inputs_of.backend.container_port = 0;
    let inputs = format!("{inputs_of:?} {t:?} {s:?}");
    Resource::from_inputs(name, l, Some(cluster), &inputs)
}

fn http_manager(svc: &Service, t: &Telemetry, s: &Serving) -> Any {
    pack_any(http_manager_config(svc, t, s))
}

/// The HTTP connection manager of `svc`'s listener, unpacked, for the
/// mesh's filter chains to add to.
pub(super) fn http_manager_config(
    svc: &Service,
    t: &Telemetry,
    s: &Serving,
) -> HttpConnectionManager {
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
            timeout: Some(proto_duration(s.request_timeout)),
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
                request_headers_to_remove: ENVOY_ONLY_REQUEST_HEADERS
                    .iter()
                    .map(|h| h.to_string())
                    .collect(),
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
        http_protocol_options: Some(http1_options()),
        server_header_transformation:
            http_connection_manager::ServerHeaderTransformation::PassThrough as i32,
        proxy_100_continue: true,
        // The client's address is appended to X-Forwarded-For; no hop
        // before Envoy is trusted to have set it.
        use_remote_address: Some(BoolValue { value: true }),
        xff_num_trusted_hops: 0,
        common_http_protocol_options: Some(common_http_options(s)),
        stream_idle_timeout: Some(proto_duration(s.stream_idle_timeout)),
        max_request_headers_kb: uint(s.max_request_headers_kb),
        tracing: telemetry::tracing(t, svc),
        access_log: telemetry::access_logs(t, svc, true),
        ..Default::default()
    };
    hcm
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
            proxy_protocol: None,
        }
    }

    fn l(svc: &Service) -> Resource {
        listener(svc, &T, &Serving::default())
    }

    fn decode_listener(svc: &Service, s: &Serving) -> Listener {
        Listener::decode(listener(svc, &T, s).any.value.as_slice()).unwrap()
    }

    fn decode_cluster(svc: &Service, s: &Serving) -> Cluster {
        Cluster::decode(cluster(svc, s).any.value.as_slice()).unwrap()
    }

    fn typed<M: Message + Default>(f: &Filter) -> M {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!("{f:?}")
        };
        M::decode(any.value.as_slice()).unwrap()
    }

    const OFF: Option<Duration> = Some(Duration {
        seconds: 0,
        nanos: 0,
    });

    #[test]
    fn names_carry_the_service_and_stay_unique_per_family() {
        let v4 = svc("0.0.0.0", Mode::Http);
        let v6 = svc("::", Mode::Http);
        assert_eq!(v4.cluster_name(), "web-prod_tcp_0-0-0-0_8080");
        assert_ne!(v4.cluster_name(), v6.cluster_name());
        assert_ne!(l(&v4).name, l(&v6).name);
        assert_eq!(l(&v4).cluster.as_deref(), Some("web-prod_tcp_0-0-0-0_8080"));
    }

    #[test]
    fn versions_are_deterministic_and_follow_content() {
        let a = svc("0.0.0.0", Mode::Http);
        let s = Serving::default();
        assert_eq!(l(&a).version, l(&a).version);
        assert_ne!(l(&a).version, l(&svc("0.0.0.0", Mode::Tcp)).version);
        assert_ne!(l(&a).version, l(&svc("0.0.0.0", Mode::Auto)).version);
        let mut moved = a.clone();
        moved.backend.container_ip = "172.17.0.9".parse().unwrap();
        assert_eq!(cluster(&a, &s).version, cluster(&moved, &s).version);
        assert_eq!(l(&a).version, l(&moved).version);
        assert_ne!(endpoints(&a).version, endpoints(&moved).version);
        let limited = Serving {
            max_connections: Some(10),
            idle_timeout: Some(std::time::Duration::from_secs(1)),
            ..Serving::default()
        };
        assert_ne!(cluster(&a, &s).version, cluster(&a, &limited).version);
        assert_ne!(l(&a).version, listener(&a, &T, &limited).version);
    }

    #[test]
    fn http_mode_is_transparent_by_default() {
        let l = decode_listener(&svc("::", Mode::Http), &Serving::default());
        assert!(l.listener_filters.is_empty() && l.default_filter_chain.is_none());
        let f = &l.filter_chains[0].filters[0];
        assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
        let hcm: HttpConnectionManager = typed(f);
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
        // What the client and backend see is theirs.
        let h1 = hcm.http_protocol_options.as_ref().unwrap();
        assert!(h1.accept_http_10);
        assert!(h1.header_key_format.is_some());
        assert_eq!(
            hcm.server_header_transformation,
            http_connection_manager::ServerHeaderTransformation::PassThrough as i32
        );
        assert!(hcm.proxy_100_continue);
        assert_eq!(hcm.use_remote_address, Some(BoolValue { value: true }));
        assert_eq!(hcm.xff_num_trusted_hops, 0);
        assert_eq!(hcm.upgrade_configs[0].upgrade_type, "websocket");
        // No limit docker-proxy lacks.
        assert_eq!(hcm.stream_idle_timeout, OFF);
        let common = hcm.common_http_protocol_options.as_ref().unwrap();
        assert_eq!(common.idle_timeout, OFF);
        assert_eq!(common.max_headers_count, uint(MAX_HEADERS_COUNT));
        assert_eq!(hcm.max_request_headers_kb, uint(8192));
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier
        else {
            panic!()
        };
        let Some(route::Action::Route(ra)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(ra.timeout, OFF);
        let addr = l.address.unwrap();
        let Some(address::Address::SocketAddress(sa)) = addr.address else {
            panic!()
        };
        assert_eq!(sa.address, "::");
        assert!(!sa.ipv4_compat);
    }

    #[test]
    fn tcp_mode_proxies_with_no_idle_timeout() {
        let l = decode_listener(&svc("0.0.0.0", Mode::Tcp), &Serving::default());
        assert!(l.listener_filters.is_empty());
        let f = &l.filter_chains[0].filters[0];
        assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
        assert_eq!(typed::<TcpProxy>(f).idle_timeout, OFF);
    }

    #[test]
    fn auto_mode_sniffs_http_and_sends_the_rest_to_tcp_proxy() {
        let s = Serving {
            sniff_timeout: std::time::Duration::from_millis(150),
            ..Serving::default()
        };
        let l = decode_listener(&svc("0.0.0.0", Mode::Auto), &s);
        assert_eq!(l.listener_filters.len(), 1);
        assert_eq!(
            l.listener_filters[0].name,
            "envoy.filters.listener.http_inspector"
        );
        assert_eq!(
            l.listener_filters_timeout,
            Some(Duration {
                seconds: 0,
                nanos: 150_000_000
            })
        );
        assert!(l.continue_on_listener_filters_timeout);
        assert_eq!(l.filter_chains.len(), 1);
        let http = &l.filter_chains[0];
        assert_eq!(
            http.filter_chain_match
                .as_ref()
                .unwrap()
                .application_protocols,
            ["http/1.0", "http/1.1", "h2c"]
        );
        assert_eq!(
            http.filters[0].name,
            "envoy.filters.network.http_connection_manager"
        );
        let tcp = l.default_filter_chain.as_ref().unwrap();
        assert_eq!(tcp.filters[0].name, "envoy.filters.network.tcp_proxy");
        assert!(tcp.filter_chain_match.is_none());
    }

    #[test]
    fn clusters_have_no_limits_and_speak_the_clients_http() {
        let c = decode_cluster(&svc("0.0.0.0", Mode::Auto), &Serving::default());
        let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
        for v in [&t.max_connections, &t.max_pending_requests, &t.max_requests] {
            assert_eq!(*v, uint(u32::MAX));
        }
        let any = &c.typed_extension_protocol_options
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let o = UpstreamHttpOptions::decode(any.value.as_slice()).unwrap();
        let Some(upstream_http::UpstreamProtocolOptions::UseDownstreamProtocolConfig(d)) =
            o.upstream_protocol_options
        else {
            panic!("{o:?}")
        };
        assert!(d.http2_protocol_options.is_some());
        assert!(d.http_protocol_options.unwrap().header_key_format.is_some());
        assert!(c.transport_socket.is_none(), "no PROXY header unless asked");
    }

    #[test]
    fn proxy_protocol_and_operator_limits() {
        let mut tcp = svc("0.0.0.0", Mode::Tcp);
        tcp.proxy_protocol = Some(ProxyProtocol::V2);
        let c = decode_cluster(&tcp, &Serving::default());
        let ts = c.transport_socket.unwrap();
        assert_eq!(ts.name, "envoy.transport_sockets.upstream_proxy_protocol");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = ts.config_type else {
            panic!()
        };
        let pp = ProxyProtocolUpstreamTransport::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            pp.config.unwrap().version,
            proxy_protocol_config::Version::V2 as i32
        );

        let secs = |n| Some(std::time::Duration::from_secs(n));
        let s = Serving {
            idle_timeout: secs(60),
            stream_idle_timeout: secs(30),
            request_timeout: secs(10),
            max_connections: Some(100),
            max_request_headers_kb: 60,
            ..Serving::default()
        };
        let t = decode_cluster(&tcp, &s)
            .circuit_breakers
            .unwrap()
            .thresholds[0];
        assert_eq!(t.max_connections, uint(100));
        let l = decode_listener(&svc("0.0.0.0", Mode::Auto), &s);
        let d = |n| {
            Some(Duration {
                seconds: n,
                nanos: 0,
            })
        };
        let tp: TcpProxy = typed(&l.default_filter_chain.unwrap().filters[0]);
        assert_eq!(tp.idle_timeout, d(60));
        let hcm: HttpConnectionManager = typed(&l.filter_chains[0].filters[0]);
        assert_eq!(hcm.stream_idle_timeout, d(30));
        assert_eq!(
            hcm.common_http_protocol_options.unwrap().idle_timeout,
            d(60)
        );
        assert_eq!(hcm.max_request_headers_kb, uint(60));
    }
}
