//! One xDS resource as the registrar serves it (name, content version,
//! packed message), the mapping facts that resources are built from
//! (`Service`), and the content hash behind every version. The building
//! blocks that `resources` and `telemetry` share.

use crate::mapping::{Backend, MappingKey, Mode};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use prost::{Message, Name};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// What the registrar knows about one TCP mapping, as the xDS layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: MappingKey,
    pub backend: Backend,
    pub mode: Mode,
    /// `<service>-<environment>`, sanitized; it starts every stat prefix
    /// and cluster name, and is the service name in traces.
    pub name: String,
    /// The service alone (ServiceName, compose service or container name).
    pub service: String,
    pub environment: Option<String>,
    pub container: Option<String>,
    pub image: Option<String>,
    /// A PROXY protocol header that Envoy sends upstream first (tcp mode).
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The PROXY protocol version of the header sent to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    V1,
    V2,
}

impl ProxyProtocol {
    pub fn parse(s: &str) -> Option<ProxyProtocol> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Some(ProxyProtocol::V1),
            "v2" | "2" => Some(ProxyProtocol::V2),
            _ => None,
        }
    }
}

impl Service {
    pub fn listener_name(&self) -> String {
        self.key.resource_name()
    }

    /// Cluster names and stat prefixes: the service name first, so that
    /// Envoy's stats read per container, then the listener name, which keeps
    /// them unique per host address.
    pub fn cluster_name(&self) -> String {
        cluster_name(&self.name, &self.key)
    }
}

/// The cluster name (and stat prefix) of the mapping `key` named `name`.
pub fn cluster_name(name: &str, key: &crate::mapping::MappingKey) -> String {
    format!("{name}_{}", key.resource_name())
}

/// One resource ready to send: name, content version and packed message.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub any: Any,
    /// For a listener: the cluster it sends traffic to, which must be warm
    /// in Envoy before the listener is sent.
    pub cluster: Option<String>,
}

/// Two resources are the same when name, version and target agree: the
/// version is a hash of the content, so the bytes need no comparing. A
/// placeholder differs from the real resource of the same version.
impl PartialEq for Resource {
    fn eq(&self, other: &Resource) -> bool {
        self.name == other.name
            && self.version == other.version
            && self.cluster == other.cluster
            && self.any.type_url == other.any.type_url
    }
}

impl Resource {
    /// A resource whose version is the hash of its encoded bytes.
    pub fn new<M: Message + Name>(name: String, msg: M, cluster: Option<String>) -> Resource {
        let any = pack_any(msg);
        Resource {
            version: content_hash(&[any.type_url.as_bytes(), &any.value]),
            name,
            any,
            cluster,
        }
    }

    /// A resource whose version is the hash of `inputs`, everything it was
    /// built from. For messages holding protobuf maps, whose encoded bytes
    /// change order from one process to the next.
    pub fn from_inputs<M: Message + Name>(
        name: String,
        msg: M,
        cluster: Option<String>,
        inputs: &str,
    ) -> Resource {
        let any = pack_any(msg);
        Resource {
            version: content_hash(&[any.type_url.as_bytes(), BUILD_SCHEMA, inputs.as_bytes()]),
            name,
            any,
            cluster,
        }
    }
}

impl Resource {
    /// Stands for a resource Envoy holds from before, known only by name and
    /// version. Its version matches what Envoy has, so it is never sent.
    pub fn placeholder(name: &str, version: &str) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            any: Any::default(),
            cluster: None,
        }
    }
}

/// Bumped whenever the builders in `resources` change what they make from the same
/// inputs, so that versions change with them.
const BUILD_SCHEMA: &[u8] = b"listener-v3";

/// FNV-1a, 64 bit, as 16 hex digits: stable across builds and restarts.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.iter().chain(&[0xffu8]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}
