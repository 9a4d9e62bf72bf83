//! The domain types every role agrees on: a port mapping as dockerd describes
//! it to a proxy, how Envoy should serve it, and what state it is in.
//!
//! These types travel over the registrar socket (see `protocol`), so they
//! derive serde, and they give the resource names that the xDS layer uses.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Transport protocol of a published port, as dockerd's `-proto` flag names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "sctp" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How Envoy proxies a TCP mapping: as HTTP (with HTTP stats and tracing),
/// as plain bytes, or, by default, whichever the first bytes of each
/// connection show it to be.
///
/// `Auto` comes last so that the wire encoding of the first two stays put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Tcp,
    #[default]
    Auto,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
            Mode::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http" => Some(Mode::Http),
            "tcp" => Some(Mode::Tcp),
            "auto" => Some(Mode::Auto),
            _ => None,
        }
    }
}

/// What makes a mapping unique on a host: only one process may own a
/// (proto, host ip, host port) triple at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MappingKey {
    pub proto: Proto,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

impl MappingKey {
    /// The name of every xDS resource built for this mapping. It uses only
    /// `[A-Za-z0-9_-]` so that Envoy's stat tags stay whole, and it differs
    /// between the IPv4 and IPv6 mappings of one port.
    pub fn resource_name(&self) -> String {
        format!(
            "{}_{}_{}",
            self.proto,
            sanitize(&self.host_ip.to_string()),
            self.host_port
        )
    }

    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl fmt::Display for MappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.proto, self.host_addr())
    }
}

/// Where the traffic of a mapping goes: the container's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub container_ip: IpAddr,
    pub container_port: u16,
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.container_ip, self.container_port)
    }
}

/// One published port exactly as dockerd hands it to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mapping {
    pub key: MappingKey,
    pub backend: Backend,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.key, self.backend.addr())
    }
}

/// Where a mapping stands with the Envoys connected to the registrar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MappingState {
    /// Registered; not every connected Envoy has accepted its listener yet
    /// (the proxy relays meanwhile).
    Pending,
    /// Every connected Envoy has accepted it, or it needs no Envoy (UDP).
    Active,
    /// An Envoy rejected its listener; the text is Envoy's own. The mapping
    /// is kept, and its proxy goes on relaying.
    Failed(String),
}

impl MappingState {
    pub fn label(&self) -> &str {
        match self {
            MappingState::Pending => "pending",
            MappingState::Active => "active",
            MappingState::Failed(_) => "failed",
        }
    }
}

/// Who accepts a TCP mapping's connections right now.
///
/// The proxy always owns the port's socket. It relays by itself until every
/// connected Envoy has bound the same address (a reuse-port group), then
/// closes its own socket so that Envoy alone serves; it takes the port back
/// when no Envoy holds it any more. UDP is always relayed by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Server {
    /// The proxy accepts and copies bytes itself, as docker-proxy does (or
    /// is still starting).
    #[default]
    Relay,
    /// The registrar told the proxy to step aside; it has not confirmed yet.
    Handover,
    /// Envoy alone accepts; the proxy holds no socket.
    Envoy,
}

impl Server {
    pub fn as_str(self) -> &'static str {
        match self {
            Server::Relay => "relay",
            Server::Handover => "handover",
            Server::Envoy => "envoy",
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapping as the registrar reports it to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingStatus {
    pub mapping: Mapping,
    pub mode: Mode,
    pub name: String,
    pub state: MappingState,
    /// Who accepts its connections now.
    pub server: Server,
    pub owner_pid: u32,
    /// The container behind it, once Docker has told us.
    pub container: Option<ContainerRef>,
}

/// One Envoy's xDS stream, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvoyStatus {
    /// The stream's number in the registrar's log.
    pub stream: u64,
    /// Seconds since it stopped answering, if it has; such a stream does not
    /// count towards readiness.
    pub stalled_secs: Option<u64>,
}

/// A container as `status` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
}

/// Keeps only `[A-Za-z0-9_-]`, mapping everything else to `-`, so that a
/// string can be part of an Envoy resource name or stat prefix.
pub fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if out.is_empty() {
        "-".to_string()
    } else {
        out
    }
}

/// One mapping as `status --json` and the registrar's `/mappings` show it.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    pub proto: String,
    pub host: String,
    pub container: String,
    pub mode: String,
    pub name: String,
    pub state: String,
    /// Who accepts the port's connections now: envoy, relay or handover.
    pub served_by: String,
    pub error: Option<String>,
    pub owner_pid: u32,
    pub container_name: Option<String>,
    pub container_id: Option<String>,
}

impl From<&MappingStatus> for Row {
    fn from(s: &MappingStatus) -> Row {
        Row {
            proto: s.mapping.key.proto.to_string(),
            host: s.mapping.key.host_addr().to_string(),
            container: s.mapping.backend.addr().to_string(),
            mode: s.mode.as_str().into(),
            name: s.name.clone(),
            state: s.state.label().into(),
            served_by: s.server.as_str().into(),
            error: match &s.state {
                MappingState::Failed(e) => Some(e.clone()),
                _ => None,
            },
            owner_pid: s.owner_pid,
            container_name: s.container.as_ref().map(|c| c.name.clone()),
            container_id: s.container.as_ref().map(|c| c.id.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, port: u16) -> MappingKey {
        MappingKey {
            proto: Proto::Tcp,
            host_ip: ip.parse().unwrap(),
            host_port: port,
        }
    }

    #[test]
    fn resource_names_are_safe_and_distinct_per_family() {
        let v4 = key("0.0.0.0", 8080).resource_name();
        let v6 = key("::", 8080).resource_name();
        assert_eq!(v4, "tcp_0-0-0-0_8080");
        assert_eq!(v6, "tcp_--_8080");
        assert_ne!(v4, v6);
        for n in [v4, v6, key("fe80::1", 1).resource_name()] {
            assert!(n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        }
    }

    #[test]
    fn sanitize_replaces_everything_unsafe() {
        assert_eq!(sanitize("web.prod:1/x"), "web-prod-1-x");
        assert_eq!(sanitize(""), "-");
        assert_eq!(sanitize("ok_Name-9"), "ok_Name-9");
    }

    #[test]
    fn mode_parse_is_forgiving_about_case_only() {
        assert_eq!(Mode::parse("TCP"), Some(Mode::Tcp));
        assert_eq!(Mode::parse(" http "), Some(Mode::Http));
        assert_eq!(Mode::parse("Auto"), Some(Mode::Auto));
        assert_eq!(Mode::parse("grpc"), None);
    }
}
