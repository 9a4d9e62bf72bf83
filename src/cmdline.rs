//! docker-proxy's command line, parsed the way Go's `flag` package does it,
//! and the names the proxy role answers to. The proxy parses its own; the
//! /proc scan parses other proxies'.
//!
//! dockerd runs the proxy as `-proto tcp -host-ip 0.0.0.0 -host-port 8080
//! -container-ip 172.17.0.2 -container-port 80 [-use-listen-fd]`. Go accepts
//! every flag as `-f v`, `-f=v`, `--f v` and `--f=v`; boolean flags take no
//! separate value but allow `-f=false`. lexopt would read `-proto` as five
//! short options, so this small parser stands on its own.

use crate::mapping::{Backend, Mapping, MappingKey, Proto};
use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::path::Path;

/// Names under which the binary is the proxy role.
pub const PROXY_NAMES: [&str; 2] = ["docker-proxy", "envoy-docker-shim"];

/// True when argv[0] names the proxy role.
pub fn is_proxy_name(argv0: &OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|n| PROXY_NAMES.contains(&n))
}

/// The proxy's flags as typed, before any socket is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyFlags {
    pub mapping: Mapping,
    /// Docker 28+: fd 4 is a socket the daemon already bound.
    pub use_listen_fd: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(ProxyFlags),
    Version,
    Help,
}

pub const USAGE: &str = "\
Usage: docker-proxy -proto tcp|udp|sctp -host-ip IP -host-port PORT \\
                    -container-ip IP -container-port PORT [-use-listen-fd]

The envoy-docker proxy role: a drop-in for Docker's userland proxy. TCP ports
are served by Envoy through the envoy-docker registrar; UDP is relayed here.

  -proto string           protocol: tcp, udp or sctp (default \"tcp\")
  -host-ip string         host IP to publish on
  -host-port int          host port to publish on
  -container-ip string    container IP to forward to
  -container-port int     container port to forward to
  -use-listen-fd          fd 4 is a socket that dockerd already bound
  -v, -version            print the version and exit

The registrar socket is $ENVOY_DOCKER_SOCKET, else /run/envoy-docker/registrar.sock.
Example: docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80";

/// Parses the arguments that follow argv[0].
pub fn parse(args: &[OsString]) -> Result<Command, String> {
    let mut proto = Proto::Tcp;
    let mut host_ip: Option<IpAddr> = None;
    let mut host_port: Option<u16> = None;
    let mut container_ip: Option<IpAddr> = None;
    let mut container_port: Option<u16> = None;
    let mut use_listen_fd = false;
    let mut version = false;

    let mut it = args.iter();
    while let Some(raw) = it.next() {
        let arg = raw
            .to_str()
            .ok_or_else(|| format!("argument is not valid UTF-8: {raw:?}"))?;
        if arg == "--" {
            if let Some(extra) = it.next() {
                return Err(format!("unexpected argument {extra:?}"));
            }
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty() && !b.starts_with('-') && !b.starts_with('='))
        else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        match name {
            "use-listen-fd" | "v" | "version" | "h" | "help" => {
                let on = match inline {
                    None => true,
                    Some(v) => parse_bool(v)
                        .ok_or_else(|| format!("invalid boolean value {v:?} for -{name}"))?,
                };
                match name {
                    "use-listen-fd" => use_listen_fd = on,
                    "v" | "version" => version |= on,
                    _ if on => return Ok(Command::Help),
                    _ => {}
                }
            }
            "proto" | "host-ip" | "host-port" | "container-ip" | "container-port" => {
                let value = match inline {
                    Some(v) => v.to_string(),
                    None => it
                        .next()
                        .ok_or_else(|| format!("flag needs an argument: -{name}"))?
                        .to_str()
                        .ok_or_else(|| format!("value of -{name} is not valid UTF-8"))?
                        .to_string(),
                };
                match name {
                    "proto" => {
                        proto = Proto::parse(&value).ok_or_else(|| {
                            format!("invalid value {value:?} for -proto: want tcp, udp or sctp")
                        })?
                    }
                    "host-ip" => host_ip = Some(parse_ip(name, &value)?),
                    "container-ip" => container_ip = Some(parse_ip(name, &value)?),
                    "host-port" => host_port = Some(parse_port(name, &value)?),
                    _ => container_port = Some(parse_port(name, &value)?),
                }
            }
            _ => return Err(format!("flag provided but not defined: -{name}")),
        }
    }

    if version {
        return Ok(Command::Version);
    }
    let missing = |what: &str| format!("missing required flag -{what}");
    let host_ip = match host_ip {
        Some(ip) => ip,
        None => "0.0.0.0".parse().expect("literal"),
    };
    Ok(Command::Run(ProxyFlags {
        mapping: Mapping {
            key: MappingKey {
                proto,
                host_ip,
                host_port: host_port.ok_or_else(|| missing("host-port"))?,
            },
            backend: Backend {
                container_ip: container_ip.ok_or_else(|| missing("container-ip"))?,
                container_port: container_port.ok_or_else(|| missing("container-port"))?,
            },
        },
        use_listen_fd,
    }))
}

/// Go's strconv.ParseBool.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn parse_ip(flag: &str, v: &str) -> Result<IpAddr, String> {
    // Go's net.ParseIP accepts no brackets or zones; neither do we.
    v.parse()
        .map_err(|_| format!("invalid value {v:?} for -{flag}: not an IP address"))
}

fn parse_port(flag: &str, v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "invalid value {v:?} for -{flag}: want a port number from 1 to 65535"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    fn run(s: &[&str]) -> ProxyFlags {
        match parse(&args(s)).unwrap() {
            Command::Run(f) => f,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn every_go_spelling_is_accepted() {
        let want = run(&[
            "-proto",
            "udp",
            "-host-ip",
            "::",
            "-host-port",
            "5353",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "53",
        ]);
        for spelled in [
            vec![
                "-proto=udp",
                "-host-ip=::",
                "-host-port=5353",
                "-container-ip=172.17.0.2",
                "-container-port=53",
            ],
            vec![
                "--proto",
                "udp",
                "--host-ip",
                "::",
                "--host-port",
                "5353",
                "--container-ip",
                "172.17.0.2",
                "--container-port",
                "53",
            ],
            vec![
                "--proto=udp",
                "--host-ip=::",
                "--host-port=5353",
                "--container-ip=172.17.0.2",
                "--container-port=53",
            ],
            vec![
                "-proto",
                "udp",
                "--host-ip=::",
                "-host-port=5353",
                "--container-ip",
                "172.17.0.2",
                "-container-port",
                "53",
            ],
        ] {
            assert_eq!(run(&spelled), want, "{spelled:?}");
        }
        assert_eq!(want.mapping.key.proto, Proto::Udp);
        assert_eq!(want.mapping.key.host_port, 5353);
        assert!(!want.use_listen_fd);
    }

    #[test]
    fn boolean_flags_follow_go() {
        let base = [
            "-host-port",
            "1",
            "-container-ip",
            "10.0.0.1",
            "-container-port",
            "2",
        ];
        for (flag, want) in [
            ("-use-listen-fd", true),
            ("--use-listen-fd", true),
            ("-use-listen-fd=true", true),
            ("--use-listen-fd=1", true),
            ("-use-listen-fd=false", false),
        ] {
            let mut a = base.to_vec();
            a.push(flag);
            assert_eq!(run(&a).use_listen_fd, want, "{flag}");
        }
        for v in ["-v", "-version", "--version", "--v=true"] {
            assert_eq!(parse(&args(&[v])).unwrap(), Command::Version);
        }
        assert_eq!(parse(&args(&["-h"])).unwrap(), Command::Help);
        assert!(parse(&args(&["-use-listen-fd=maybe"])).is_err());
    }

    #[test]
    fn defaults_and_required_flags() {
        let f = run(&[
            "-host-port",
            "80",
            "-container-ip",
            "1.2.3.4",
            "-container-port",
            "8",
        ]);
        assert_eq!(f.mapping.key.proto, Proto::Tcp);
        assert_eq!(f.mapping.key.host_ip.to_string(), "0.0.0.0");
        let e = parse(&args(&["-host-port", "80"])).unwrap_err();
        assert!(e.contains("-container-ip"), "{e}");
    }

    #[test]
    fn bad_input_gives_one_clear_message() {
        let cases: &[(&[&str], &str)] = &[
            (&["-bogus", "1"], "flag provided but not defined: -bogus"),
            (&["-host-ip", "300.1.1.1"], "not an IP address"),
            (&["-host-port", "70000"], "port number"),
            (&["-host-port", "0"], "port number"),
            (&["-container-port=-1"], "port number"),
            (&["-proto", "icmp"], "want tcp, udp or sctp"),
            (&["-proto"], "flag needs an argument: -proto"),
            (&["stray"], "unexpected argument"),
            (&["---proto", "tcp"], "unexpected argument"),
        ];
        for (a, want) in cases {
            let e = parse(&args(a)).unwrap_err();
            assert!(e.contains(want), "{a:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
