//! Pure builders for the mesh (`serve --mesh`): the certificates as SDS
//! secrets, the mesh ingress listener, and the mutual TLS that egress
//! clusters speak to other hosts' mesh ports.
//!
//! - **Secrets.** `mesh-trust-<fingerprint>` holds the root as the trust
//!   bundle, and accepts only URI names in the trust domain. Each
//!   identity's leaf is a secret named by its SPIFFE id. Listeners and
//!   clusters name secrets and never hold a key, so a leaf's rotation
//!   changes one secret and rebuilds no listener. A new root is a new
//!   name on purpose: the ingress's filter chains and the egress clusters
//!   change with it, so Envoy drains the connections that were made under
//!   the old trust instead of keeping them for as long as they stay open.
//! - **Ingress.** One listener `mesh_in` on `<advertise>:<mesh port>`.
//!   TLS inspector, then a filter chain per local service chosen by SNI
//!   `<service>.<TD>`. It requires a client certificate that chains to the
//!   root and presents the service's own leaf. An RBAC filter allows only
//!   the principals of `MeshAllow`, if set (for HTTP, a 403). Then the
//!   service's own mode, to a cluster of its local instances. Each
//!   connection is logged when it closes, and each HTTP 403, to the
//!   registrar's access-log service (`access_log`), which counts
//!   handshakes and denials per service and caller.
//! - **Egress.** An endpoint on another host that has a mesh port is that
//!   host's mesh port, one per host. Its connections take the transport
//!   socket matched by the endpoint's `mesh` metadata: TLS with SNI
//!   `<service>.<TD>`, the caller's leaf, and the root as trust, checking
//!   that the server is `spiffe://TD/svc/<service>`. Local endpoints stay
//!   plain. Which leaf is the caller's is decided by the listener: a filter
//!   chain per local caller identity, matched by the callers' source
//!   addresses, leads to a cluster of that identity; the default chain
//!   leads to the host identity's. All the clusters of one service share
//!   one assignment (EDS `service_name`).

use super::resource::{Resource, Service};
use super::resources::{ads, base_cluster, http_manager_config, socket_address, tcp_filter};
use super::serving::Serving;
use super::telemetry::Telemetry;
use crate::mapping::{sanitize, Backend, MappingKey, Mode, Proto};
use crate::mesh::TrustDomain;
use envoy_types::pb::envoy::config::accesslog::v3::{
    access_log, access_log_filter, comparison_filter, AccessLog, AccessLogFilter, ComparisonFilter,
    StatusCodeFilter,
};
use envoy_types::pb::envoy::config::core::v3::{
    data_source, grpc_service, transport_socket, ApiVersion, CidrRange, DataSource, GrpcService,
    RuntimeUInt32, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::extensions::access_loggers::grpc::v3::{
    CommonGrpcAccessLogConfig, HttpGrpcAccessLogConfig, TcpGrpcAccessLogConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, subject_alt_name_matcher, CertificateValidationContext,
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher,
    TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{value, BoolValue, Struct, UInt32Value, Value};
use envoy_types::util::pack_any;
use std::net::{IpAddr, SocketAddr};

/// The prefix of the secret that holds the trust bundle.
pub const TRUST_PREFIX: &str = "mesh-trust-";
/// The mesh ingress listener.
pub const LISTENER: &str = "mesh_in";
/// The endpoint metadata key that picks the mesh transport socket.
const MATCH_KEY: &str = "mesh";

/// This host's place in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub trust_domain: TrustDomain,
    /// `<advertise>:<mesh port>`: where the ingress listens.
    pub listen: SocketAddr,
    /// The trust bundle's secret name (`trust_name`).
    pub trust: String,
}

/// The name of the secret for the root `root_pem`: `mesh-trust-` and the
/// first 16 hex digits of the SHA-256 of its text.
pub fn trust_name(root_pem: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, root_pem.trim().as_bytes());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{TRUST_PREFIX}{hex}")
}

/// What egress needs of the mesh: this host's place, and the local
/// callers that have an identity of their own (service to addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEgress {
    pub mesh: Mesh,
    pub host_id: String,
    pub callers: std::collections::BTreeMap<String, Vec<IpAddr>>,
}

/// One local service as the mesh ingress serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    pub service: String,
    pub mode: Mode,
    /// Its local instances' container addresses.
    pub backends: Vec<SocketAddr>,
    /// The SPIFFE ids allowed to call it; `None`: any in the trust domain.
    pub allow: Option<Vec<String>>,
}

fn inline(text: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.into())),
        ..Default::default()
    })
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

/// An access log to the registrar's ALS: per connection (`http`: false,
/// for the listener), or per HTTP request answered 403.
fn als(http: bool) -> AccessLog {
    let common_config = Some(CommonGrpcAccessLogConfig {
        log_name: super::access_log::LOG_NAME.into(),
        grpc_service: Some(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: super::bootstrap::XDS_CLUSTER.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        transport_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    });
    let (name, config, filter) = if http {
        let forbidden = AccessLogFilter {
            filter_specifier: Some(access_log_filter::FilterSpecifier::StatusCodeFilter(
                StatusCodeFilter {
                    comparison: Some(ComparisonFilter {
                        op: comparison_filter::Op::Eq as i32,
                        value: Some(RuntimeUInt32 {
                            default_value: 403,
                            runtime_key: "envoy_docker.mesh.denied_status".into(),
                        }),
                    }),
                },
            )),
        };
        let c = pack_any(HttpGrpcAccessLogConfig {
            common_config,
            ..Default::default()
        });
        ("envoy.access_loggers.http_grpc", c, Some(forbidden))
    } else {
        let c = pack_any(TcpGrpcAccessLogConfig { common_config });
        ("envoy.access_loggers.tcp_grpc", c, None)
    };
    AccessLog {
        name: name.into(),
        filter,
        config_type: Some(access_log::ConfigType::TypedConfig(config)),
    }
}

fn uri_matcher(m: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(m),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The trust bundle: the root, and only names in the trust domain, under
/// the name `trust_name(root_pem)`.
pub fn trust_secret(td: &TrustDomain, root_pem: &str) -> Resource {
    let name = trust_name(root_pem);
    let v = CertificateValidationContext {
        trusted_ca: inline(root_pem),
        match_typed_subject_alt_names: vec![uri_matcher(string_matcher::MatchPattern::Prefix(
            format!("{}/", td.uri()),
        ))],
        ..Default::default()
    };
    let s = Secret {
        name: name.clone(),
        r#type: Some(secret::Type::ValidationContext(v)),
    };
    Resource::new(name, s, None)
}

/// One identity's leaf and key, as the secret named by its SPIFFE id.
pub fn identity_secret(id: &str, chain_pem: &str, key_pem: &str) -> Resource {
    let s = Secret {
        name: id.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    };
    Resource::new(id.into(), s, None)
}

fn common_tls(id: &str, validation: common_tls_context::ValidationContextType) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(id)],
        validation_context_type: Some(validation),
        ..Default::default()
    }
}

fn tls_socket<M: prost::Message + prost::Name>(msg: M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(msg))),
    }
}

/// The facts the shared builders take for the mesh ingress of `service`.
fn ingress_service(m: &Mesh, i: &Ingress) -> Service {
    Service {
        key: MappingKey {
            proto: Proto::Tcp,
            host_ip: m.listen.ip(),
            host_port: m.listen.port(),
        },
        backend: Backend {
            container_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            container_port: 0,
        },
        // Inside TLS there is nothing to sniff: auto is served as tcp.
        mode: if i.mode == Mode::Http {
            Mode::Http
        } else {
            Mode::Tcp
        },
        name: format!("mesh-in-{}", sanitize(&i.service)),
        service: i.service.clone(),
        environment: None,
        container: None,
        image: None,
        proxy_protocol: None,
    }
}

fn allow_rules(allow: &[String]) -> Rbac {
    let principals = allow
        .iter()
        .map(|id| Principal {
            identifier: Some(principal::Identifier::Authenticated(
                principal::Authenticated {
                    principal_name: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                        ..Default::default()
                    }),
                },
            )),
        })
        .collect();
    Rbac {
        action: rbac::Action::Allow as i32,
        policies: [(
            "mesh-allow".to_string(),
            Policy {
                permissions: vec![Permission {
                    rule: Some(permission::Rule::Any(true)),
                }],
                principals,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// The stat prefix of a service's RBAC counts on the ingress.
pub fn rbac_prefix(service: &str) -> String {
    format!("mesh_in_{}.", sanitize(service))
}

/// The ingress's resources: a cluster and an assignment per service, and
/// the listener (none without services).
pub fn ingress(
    m: &Mesh,
    services: &[Ingress],
    t: &Telemetry,
    s: &Serving,
) -> (Vec<Resource>, Vec<Resource>, Option<Resource>) {
    let (mut clusters, mut assignments, mut chains) = (Vec::new(), Vec::new(), Vec::new());
    for i in services {
        let svc = ingress_service(m, i);
        let name = svc.cluster_name();
        let c = base_cluster(&svc, s);
        clusters.push(Resource::new(name.clone(), c, None));
        let cla = ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: i
                    .backends
                    .iter()
                    .map(|b| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket_address(b.ip(), b.port())),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assignments.push(Resource::new(name.clone(), cla, None));
        let mut filters = Vec::new();
        if svc.mode == Mode::Http {
            let mut hcm = http_manager_config(&svc, t, s);
            hcm.access_log.push(als(true));
            if let Some(allow) = &i.allow {
                hcm.http_filters.insert(
                    0,
                    HttpFilter {
                        name: "envoy.filters.http.rbac".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                            HttpRbac {
                                rules: Some(allow_rules(allow)),
                                ..Default::default()
                            },
                        ))),
                        ..Default::default()
                    },
                );
            }
            filters.push(Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            });
        } else {
            if let Some(allow) = &i.allow {
                filters.push(Filter {
                    name: "envoy.filters.network.rbac".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
                        rules: Some(allow_rules(allow)),
                        stat_prefix: rbac_prefix(&i.service),
                        ..Default::default()
                    }))),
                });
            }
            filters.push(tcp_filter(&svc, t, s));
        }
        let tls = DownstreamTlsContext {
            common_tls_context: Some(common_tls(
                &m.trust_domain.service(&i.service),
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    &m.trust,
                )),
            )),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        chains.push(FilterChain {
            name: i.service.clone(),
            filter_chain_match: Some(FilterChainMatch {
                server_names: vec![m.trust_domain.sni(&i.service)],
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            filters,
            transport_socket: Some(tls_socket(tls)),
            ..Default::default()
        });
    }
    if chains.is_empty() {
        return (clusters, assignments, None);
    }
    let l = Listener {
        name: LISTENER.into(),
        address: Some(socket_address(m.listen.ip(), m.listen.port())),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        access_log: vec![als(false)],
        ..Default::default()
    };
    // RBAC policies are a protobuf map: the version comes from the inputs.
    let inputs = format!("{m:?} {services:?} {t:?} {s:?}");
    let listener = Resource::from_inputs(LISTENER.into(), l, None, &inputs);
    (clusters, assignments, Some(listener))
}

/// The TLS a caller `id` speaks to `service`'s instances on other hosts.
pub fn upstream_tls(m: &Mesh, service: &str, id: &str) -> TransportSocket {
    let validation = common_tls_context::ValidationContextType::CombinedValidationContext(
        common_tls_context::CombinedCertificateValidationContext {
            default_validation_context: Some(CertificateValidationContext {
                match_typed_subject_alt_names: vec![uri_matcher(
                    string_matcher::MatchPattern::Exact(m.trust_domain.service(service)),
                )],
                ..Default::default()
            }),
            validation_context_sds_secret_config: Some(sds(&m.trust)),
            ..Default::default()
        },
    );
    tls_socket(UpstreamTlsContext {
        common_tls_context: Some(common_tls(id, validation)),
        sni: m.trust_domain.sni(service),
        ..Default::default()
    })
}

/// The metadata that marks an endpoint as another host's mesh port.
pub fn mesh_match() -> Struct {
    Struct {
        fields: [(
            MATCH_KEY.to_string(),
            Value {
                kind: Some(value::Kind::BoolValue(true)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// A source-address match for a caller identity's filter chains.
pub fn sources(ips: &[IpAddr]) -> Vec<CidrRange> {
    ips.iter()
        .map(|ip| CidrRange {
            address_prefix: ip.to_string(),
            prefix_len: Some(UInt32Value {
                value: if ip.is_ipv4() { 32 } else { 128 },
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn mesh() -> Mesh {
        Mesh {
            trust_domain: TrustDomain::parse("mesh.test").unwrap(),
            listen: "10.0.0.1:15443".parse().unwrap(),
            trust: trust_name("ROOT"),
        }
    }

    fn web(mode: Mode, allow: Option<Vec<String>>) -> Ingress {
        Ingress {
            service: "web".into(),
            mode,
            backends: vec!["172.17.0.2:80".parse().unwrap()],
            allow,
        }
    }

    #[test]
    fn the_ingress_picks_the_service_by_sni_and_requires_a_client_certificate() {
        let m = mesh();
        let (c, a, l) = ingress(
            &m,
            &[web(Mode::Tcp, None)],
            &Default::default(),
            &Default::default(),
        );
        assert_eq!((c.len(), a.len()), (1, 1));
        let l = Listener::decode(l.unwrap().any.value.as_slice()).unwrap();
        assert_eq!(l.name, LISTENER);
        let chain = &l.filter_chains[0];
        let fcm = chain.filter_chain_match.as_ref().unwrap();
        assert_eq!(fcm.server_names, ["web.mesh.test"]);
        let names: Vec<&str> = chain.filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["envoy.filters.network.tcp_proxy"]);
        let Some(transport_socket::ConfigType::TypedConfig(any)) =
            &chain.transport_socket.as_ref().unwrap().config_type
        else {
            panic!()
        };
        let tls = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            tls.require_client_certificate,
            Some(BoolValue { value: true })
        );
        let common = tls.common_tls_context.unwrap();
        assert_eq!(
            common.tls_certificate_sds_secret_configs[0].name,
            "spiffe://mesh.test/svc/web"
        );
        // No services: no listener.
        assert!(ingress(&m, &[], &Default::default(), &Default::default())
            .2
            .is_none());
    }

    #[test]
    fn mesh_allow_puts_an_rbac_filter_first_in_either_mode() {
        let m = mesh();
        let allow = Some(vec!["spiffe://mesh.test/svc/frontend".to_string()]);
        for (mode, want) in [
            (Mode::Tcp, "envoy.filters.network.rbac"),
            (Mode::Http, "envoy.filters.network.http_connection_manager"),
        ] {
            let (_, _, l) = ingress(
                &m,
                &[web(mode, allow.clone())],
                &Default::default(),
                &Default::default(),
            );
            let l = Listener::decode(l.unwrap().any.value.as_slice()).unwrap();
            assert_eq!(l.filter_chains[0].filters[0].name, want);
            // The allowed principal is in the filter's (packed) config.
            let Some(filter::ConfigType::TypedConfig(any)) =
                &l.filter_chains[0].filters[0].config_type
            else {
                panic!()
            };
            let needle = b"spiffe://mesh.test/svc/frontend";
            assert!(any.value.windows(needle.len()).any(|w| w == needle));
        }
    }

    #[test]
    fn secrets_carry_the_bundle_and_the_leaf() {
        let m = mesh();
        let r = trust_secret(&m.trust_domain, "ROOT");
        assert_eq!(r.name, m.trust);
        let t = Secret::decode(r.any.value.as_slice()).unwrap();
        assert_eq!(t.name, m.trust);
        let Some(secret::Type::ValidationContext(v)) = t.r#type else {
            panic!()
        };
        assert_eq!(v.trusted_ca, inline("ROOT"));
        let r = identity_secret("spiffe://mesh.test/svc/web", "CHAIN", "KEY");
        assert_eq!(r.name, "spiffe://mesh.test/svc/web");
        assert_ne!(
            r.version,
            identity_secret("spiffe://mesh.test/svc/web", "CHAIN2", "KEY").version
        );
    }

    #[test]
    fn a_new_root_is_a_new_trust_name_and_a_new_ingress() {
        assert_eq!(trust_name("ROOT\n"), trust_name("ROOT"));
        assert_ne!(trust_name("ROOT"), trust_name("OTHER"));
        assert!(trust_name("ROOT").starts_with(TRUST_PREFIX));
        assert_eq!(trust_name("ROOT").len(), TRUST_PREFIX.len() + 16);
        let a = mesh();
        let b = Mesh {
            trust: trust_name("OTHER"),
            ..mesh()
        };
        let ingress = |m: &Mesh| {
            let i = Ingress {
                service: "web".into(),
                mode: Mode::Tcp,
                backends: vec!["172.17.0.2:80".parse().unwrap()],
                allow: None,
            };
            let (_, _, l) = ingress(m, &[i], &Default::default(), &Default::default());
            l.unwrap().version
        };
        assert_ne!(ingress(&a), ingress(&b));
    }
}
