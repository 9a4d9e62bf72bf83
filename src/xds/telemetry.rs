//! What Envoy gets for observability, as pure builders: the tracing
//! collector's cluster, each HTTP listener's tracing provider, custom tags
//! and decorator, and JSON access logs.
//!
//! - OpenTelemetry (`otlp=HOST:PORT`, OTLP over gRPC): every container's
//!   connection manager has its own `service_name`, so each container is its
//!   own service in Jaeger.
//! - Zipkin (`zipkin=HOST:PORT`, v2 JSON over HTTP): Envoy takes the service
//!   name from the node's cluster, one for all listeners; the container's
//!   name goes into the tags.
//! - Every span carries `envoy_docker.service`, `.environment`,
//!   `.container`, `.image` and `.host_port`.

use super::resource::{Resource, Service};
use envoy_types::pb::envoy::config::accesslog::v3::{access_log, AccessLog};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, grpc_service, socket_address, substitution_format_string, Address, GrpcService,
    SocketAddress, SubstitutionFormatString,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::trace::v3::{
    tracing::http::ConfigType as ProviderConfig, tracing::Http as Provider, zipkin_config,
    OpenTelemetryConfig, ZipkinConfig,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log, FileAccessLog,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config, ExplicitHttpConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::tracing::v3::{custom_tag, CustomTag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{value, Duration, Struct, Value};
use envoy_types::util::pack_any;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const COLLECTOR_CLUSTER: &str = "envoy_docker_tracing";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracerKind {
    Otlp,
    Zipkin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracer {
    pub kind: TracerKind,
    pub addr: SocketAddr,
}

impl Tracer {
    /// `otlp=HOST:PORT` or `zipkin=HOST:PORT`.
    pub fn parse(s: &str) -> Result<Tracer, String> {
        let (kind, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("want otlp=HOST:PORT or zipkin=HOST:PORT, not {s:?}"))?;
        let kind = match kind {
            "otlp" => TracerKind::Otlp,
            "zipkin" => TracerKind::Zipkin,
            other => return Err(format!("unknown tracer {other:?}: want otlp or zipkin")),
        };
        match crate::addr::Addr::parse(addr)? {
            crate::addr::Addr::Tcp(addr) => Ok(Tracer { kind, addr }),
            crate::addr::Addr::Unix(_) => Err("the collector must be HOST:PORT".into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

impl AccessLogTarget {
    pub fn parse(s: &str) -> AccessLogTarget {
        match s {
            "stdout" | "-" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(PathBuf::from(path)),
        }
    }

    fn path(&self) -> String {
        match self {
            AccessLogTarget::Stdout => "/dev/stdout".into(),
            AccessLogTarget::File(p) => p.to_string_lossy().into_owned(),
        }
    }
}

/// The registrar's observability settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub tracer: Option<Tracer>,
    /// Percent of requests traced.
    pub sampling: f64,
    pub access_log: Option<AccessLogTarget>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            tracer: None,
            sampling: 100.0,
            access_log: None,
        }
    }
}

/// The collector's cluster: static, and HTTP/2 for OTLP's gRPC.
pub fn collector_cluster(t: &Tracer) -> Resource {
    let mut c = Cluster {
        name: COLLECTOR_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: COLLECTOR_CLUSTER.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: t.addr.ip().to_string(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    t.addr.port() as u32,
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if t.kind == TracerKind::Otlp {
        let http2 = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(
                        explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            pack_any(http2),
        );
    }
    Resource::new(COLLECTOR_CLUSTER.into(), c, None)
}

fn literal(tag: &str, value: &str) -> CustomTag {
    CustomTag {
        tag: tag.into(),
        r#type: Some(custom_tag::Type::Literal(custom_tag::Literal {
            value: value.into(),
        })),
    }
}

/// The tags every span of this service carries. Envoy refuses empty
/// literals, so what is unknown (no environment label, no Docker) is left
/// out.
pub fn custom_tags(svc: &Service) -> Vec<CustomTag> {
    let host_port = svc.key.host_addr().to_string();
    [
        ("envoy_docker.service", Some(svc.service.as_str())),
        ("envoy_docker.environment", svc.environment.as_deref()),
        ("envoy_docker.container", svc.container.as_deref()),
        ("envoy_docker.image", svc.image.as_deref()),
        ("envoy_docker.host_port", Some(host_port.as_str())),
    ]
    .into_iter()
    .filter_map(|(tag, v)| v.filter(|v| !v.is_empty()).map(|v| literal(tag, v)))
    .collect()
}

/// The connection manager's tracing block, if tracing is on.
pub fn tracing(t: &Telemetry, svc: &Service) -> Option<Tracing> {
    let tracer = t.tracer?;
    let provider = match tracer.kind {
        TracerKind::Otlp => Provider {
            name: "envoy.tracers.opentelemetry".into(),
            config_type: Some(ProviderConfig::TypedConfig(pack_any(OpenTelemetryConfig {
                grpc_service: Some(GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: COLLECTOR_CLUSTER.into(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }),
                service_name: svc.name.clone(),
                ..Default::default()
            }))),
        },
        TracerKind::Zipkin => Provider {
            name: "envoy.tracers.zipkin".into(),
            config_type: Some(ProviderConfig::TypedConfig(pack_any(ZipkinConfig {
                collector_cluster: COLLECTOR_CLUSTER.into(),
                collector_endpoint: "/api/v2/spans".into(),
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                    as i32,
                trace_id_128bit: true,
                ..Default::default()
            }))),
        },
    };
    Some(Tracing {
        random_sampling: Some(Percent { value: t.sampling }),
        custom_tags: custom_tags(svc),
        provider: Some(provider),
        ..Default::default()
    })
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.into())),
    }
}

/// JSON access log lines that name the container; `http` adds request
/// fields that a TCP proxy does not have.
pub fn access_logs(t: &Telemetry, svc: &Service, http: bool) -> Vec<AccessLog> {
    let Some(target) = &t.access_log else {
        return Vec::new();
    };
    let mut fields = vec![
        ("start_time", text("%START_TIME%")),
        ("service", text(&svc.name)),
        ("service_name", text(&svc.service)),
        (
            "environment",
            text(svc.environment.as_deref().unwrap_or("")),
        ),
        ("container", text(svc.container.as_deref().unwrap_or(""))),
        ("host_port", text(&svc.key.host_addr().to_string())),
        ("duration_ms", text("%DURATION%")),
        ("bytes_received", text("%BYTES_RECEIVED%")),
        ("bytes_sent", text("%BYTES_SENT%")),
        ("client", text("%DOWNSTREAM_REMOTE_ADDRESS%")),
        ("upstream", text("%UPSTREAM_HOST%")),
    ];
    if http {
        fields.extend([
            ("status", text("%RESPONSE_CODE%")),
            ("method", text("%REQ(:METHOD)%")),
            ("path", text("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%")),
            ("protocol", text("%PROTOCOL%")),
            ("request_id", text("%REQ(X-REQUEST-ID)%")),
            ("flags", text("%RESPONSE_FLAGS%")),
        ]);
    } else {
        fields.push(("flags", text("%RESPONSE_FLAGS%")));
    }
    let json = Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let format = file_access_log::AccessLogFormat::LogFormat(SubstitutionFormatString {
        format: Some(substitution_format_string::Format::JsonFormat(json)),
        ..Default::default()
    });
    vec![AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
            FileAccessLog {
                path: target.path(),
                access_log_format: Some(format),
            },
        ))),
        ..Default::default()
    }]
}
