//! Addresses and defaults that several roles share: where the registrar's
//! socket is, where the xDS server listens, and the `ADDR` syntax
//! (`HOST:PORT`, `[V6]:PORT` or `unix:PATH`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

pub const DEFAULT_SOCKET: &str = "/run/envoy-docker/registrar.sock";
pub const SOCKET_ENV: &str = "ENVOY_DOCKER_SOCKET";
/// Root-only (0600), so that no local user can pose as an Envoy.
pub const DEFAULT_XDS: &str = "unix:/run/envoy-docker/xds.sock";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
pub const DEFAULT_NODE_ID: &str = "envoy-docker";
pub const DEFAULT_REGISTRAR_ADMIN: &str = "127.0.0.1:18001";

/// The registrar socket: the flag if given, else `$ENVOY_DOCKER_SOCKET`,
/// else the default. dockerd passes the proxy no flags of ours, so the
/// environment is how a proxy learns a non-default path.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os(SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Why a listener could not be set up: `what` says which (the registrar
/// socket, xDS, the admin endpoint), `at` where.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{at} is already being served ({what}: another registrar?)")]
    InUse { what: &'static str, at: String },
    #[error("cannot set up {what} on {at}")]
    Io {
        what: &'static str,
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} takes {want}, not {at}")]
    Kind {
        what: &'static str,
        at: String,
        want: &'static str,
    },
}

impl ListenError {
    pub fn io(
        what: &'static str,
        at: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> ListenError {
        let at = at.to_string();
        move |source| ListenError::Io { what, at, source }
    }
}

/// A place to listen on or connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("bad address {s:?}: unix: needs a path"));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Addr::Tcp(sa));
        }
        // `localhost:PORT` is common enough to accept; other names are not
        // resolved, so that what Envoy and the registrar use is explicit.
        if let Some(port) = s.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(Addr::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )));
            }
        }
        Err(format!(
            "bad address {s:?}: want IP:PORT, [IPV6]:PORT or unix:PATH"
        ))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(sa) => write!(f, "{sa}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            Addr::parse("127.0.0.1:18000").unwrap(),
            Addr::Tcp("127.0.0.1:18000".parse().unwrap())
        );
        assert_eq!(
            Addr::parse("[::1]:9901").unwrap(),
            Addr::Tcp("[::1]:9901".parse().unwrap())
        );
        assert_eq!(
            Addr::parse("unix:/run/x.sock").unwrap(),
            Addr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            Addr::parse("localhost:1").unwrap(),
            Addr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        for bad in ["", "unix:", "::1:80", "host:80", "1.2.3.4", "1.2.3.4:99999"] {
            assert!(Addr::parse(bad).is_err(), "{bad}");
        }
    }
}
