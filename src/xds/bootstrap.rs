//! The Envoy v3 bootstrap (YAML) that takes every listener and cluster
//! from the registrar over ADS; `envoy-docker bootstrap` prints it and
//! `serve --envoy` starts its Envoy with it.
//!
//! `initial_fetch_timeout: 0s` makes a fresh Envoy wait for the registrar
//! instead of starting empty after 15 s. A `unix:` xDS address becomes a
//! static `pipe` cluster; HTTP/2 is switched on explicitly there, since
//! there is no ALPN to negotiate it.

use crate::addr::Addr;

/// State of the world or incremental (delta) ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsKind {
    Sotw,
    Delta,
}

/// What the bootstrap says: where the registrar's xDS and Envoy's admin
/// listen, the node id, and the ADS flavor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub xds: Addr,
    pub admin: Addr,
    pub node_id: String,
    pub ads: AdsKind,
}

/// The static cluster that leads to the registrar (ADS, and the mesh's
/// access-log service).
pub const XDS_CLUSTER: &str = "envoy_docker_xds";

fn address_yaml(addr: &Addr, indent: &str) -> String {
    match addr {
        Addr::Tcp(sa) => format!(
            "{indent}socket_address:\n{indent}  address: \"{}\"\n{indent}  port_value: {}\n",
            sa.ip(),
            sa.port()
        ),
        Addr::Unix(path) => format!(
            "{indent}pipe:\n{indent}  path: {}\n",
            yaml_string(&path.to_string_lossy())
        ),
    }
}

/// A double-quoted YAML scalar.
fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

pub fn render(args: &Bootstrap) -> String {
    let api_type = match args.ads {
        AdsKind::Sotw => "GRPC",
        AdsKind::Delta => "DELTA_GRPC",
    };
    let node = yaml_string(&args.node_id);
    let admin = address_yaml(&args.admin, "    ");
    let xds = address_yaml(&args.xds, "              ");
    format!(
        "# Envoy bootstrap made by `envoy-docker bootstrap`: Envoy takes every
# listener and cluster from the envoy-docker registrar over ADS.
node:
  id: {node}
  cluster: {node}
admin:
  address:
{admin}dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc:
        cluster_name: {XDS_CLUSTER}
  cds_config:
    ads: {{}}
    resource_api_version: V3
    initial_fetch_timeout: 0s
  lds_config:
    ads: {{}}
    resource_api_version: V3
    initial_fetch_timeout: 0s
static_resources:
  clusters:
  - name: {XDS_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: {XDS_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
{xds}",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_addresses() {
        let mut args = Bootstrap {
            xds: Addr::parse("[::1]:18000").unwrap(),
            admin: Addr::parse("127.0.0.1:9901").unwrap(),
            node_id: "n\"1".into(),
            ads: AdsKind::Delta,
        };
        let y = render(&args);
        assert!(y.contains("api_type: DELTA_GRPC"));
        assert!(y.contains("address: \"::1\""));
        assert!(y.contains("id: \"n\\\"1\""));
        args.xds = Addr::parse("unix:/run/envoy-docker/xds.sock").unwrap();
        args.ads = AdsKind::Sotw;
        let y = render(&args);
        assert!(y.contains("pipe:\n                path: \"/run/envoy-docker/xds.sock\""));
        assert!(y.contains("api_type: GRPC"));
    }
}
