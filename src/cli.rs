//! Flags of the subcommands other than `proxy`, parsed with lexopt into
//! each role's own `Config`, and the help text of every subcommand.

use crate::addr::{Addr, DEFAULT_ADMIN, DEFAULT_NODE_ID, DEFAULT_REGISTRAR_ADMIN, DEFAULT_XDS};
use crate::applet::Applet;
use crate::bootstrap::Config as BootstrapArgs;
use crate::ca::Config as CaArgs;
use crate::install::InstallArgs;
use crate::mapping::Mode;
use crate::mesh::TrustDomain;
use crate::registrar::fleet::{Config as FleetConfig, EgressAt};
use crate::registrar::Config as ServeArgs;
use crate::resync::Config as ResyncArgs;
use crate::status::Config as StatusArgs;
use crate::xds::bootstrap::{AdsKind, Bootstrap};
use crate::xds::serving::{parse_duration, Serving, MAX_REQUEST_HEADERS_KB};
use crate::xds::telemetry::{AccessLogTarget, Telemetry, Tracer};
use lexopt::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;

/// Either the parsed flags or a request for help.
#[derive(Debug)]
pub enum Parsed<T> {
    Run(T),
    Help,
}

fn addr(v: OsString) -> Result<Addr, String> {
    Addr::parse(&v.string().map_err(|e| e.to_string())?)
}

fn text(v: OsString) -> Result<String, String> {
    let s = v.string().map_err(|e| e.to_string())?;
    if s.is_empty() {
        return Err("empty value".into());
    }
    Ok(s)
}

/// Runs `each` for every flag; adds the flag name to any error.
fn parse_flags(
    args: Vec<OsString>,
    mut each: impl FnMut(&str, &mut lexopt::Parser) -> Result<bool, String>,
) -> Result<bool, String> {
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        let name = match arg {
            Long("help") | Short('h') => return Ok(false),
            Long(l) => format!("--{l}"),
            Short(s) => format!("-{s}"),
            Value(v) => return Err(format!("unexpected argument {:?}", v.to_string_lossy())),
        };
        if !each(&name, &mut p).map_err(|e| format!("{name}: {e}"))? {
            return Err(format!("unknown flag {name}"));
        }
    }
    Ok(true)
}

fn value(p: &mut lexopt::Parser) -> Result<OsString, String> {
    p.value().map_err(|e| e.to_string())
}

fn duration(v: OsString) -> Result<Option<std::time::Duration>, String> {
    parse_duration(&text(v)?)
}

pub fn serve(args: Vec<OsString>) -> Result<Parsed<ServeArgs>, String> {
    let mut out = ServeArgs {
        socket: None,
        xds: Addr::parse(DEFAULT_XDS).expect("default"),
        default_mode: Mode::Auto,
        node_id: DEFAULT_NODE_ID.into(),
        no_recover: false,
        envoy: None,
        docker: None,
        telemetry: Telemetry::default(),
        serving: Serving::default(),
        admin: Some(Addr::parse(DEFAULT_REGISTRAR_ADMIN).expect("default")),
        admin_token_file: None,
        envoy_admin: Addr::parse(DEFAULT_ADMIN).expect("default"),
        proxy_exe: None,
        fleet: None,
        mesh: None,
        nft: Some(crate::nft::DEFAULT_NFT.into()),
    };
    let mut fleet = FleetFlags::default();
    let (mut mesh_dir, mut mesh_port, mut leaf_ttl) = (None, None, None);
    let run = parse_flags(args, |name, p| {
        match name {
            "--catalog" => {
                let v = text(value(p)?)?;
                let urls = v
                    .strip_prefix("etcd=")
                    .ok_or_else(|| format!("want etcd=http://IP:PORT[,...], not {v:?}"))?;
                crate::etcd::endpoints(urls).map_err(|e| e.to_string())?;
                fleet.etcd = Some(urls.to_string());
            }
            "--advertise" => {
                let v = text(value(p)?)?;
                let ip: std::net::IpAddr = v
                    .parse()
                    .map_err(|_| format!("want an IP address, not {v:?}"))?;
                if ip.is_unspecified() || ip.is_loopback() {
                    return Err(format!("{ip} cannot be reached from other hosts"));
                }
                fleet.advertise = Some(ip);
            }
            "--host-id" => {
                let v = text(value(p)?)?;
                crate::catalog::key("x", &v, "x").map_err(|e| e.to_string())?;
                fleet.host_id = Some(v);
            }
            "--egress" => {
                let v = text(value(p)?)?;
                fleet.egress = Some(if v == "none" {
                    EgressAt::Off
                } else {
                    EgressAt::At(
                        v.parse()
                            .map_err(|_| format!("want an IP address or none, not {v:?}"))?,
                    )
                });
            }
            "--catalog-ttl" => {
                let d = duration(value(p)?)?
                    .filter(|d| d.as_secs() >= 2)
                    .ok_or("want 2s or more")?;
                fleet.ttl = Some(d);
            }
            "--mesh" => mesh_dir = Some(PathBuf::from(value(p)?)),
            "--mesh-port" => {
                let v = text(value(p)?)?;
                mesh_port = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("want a port from 1 to 65535, not {v:?}"))?,
                )
            }
            "--mesh-leaf-ttl" => {
                leaf_ttl = Some(
                    duration(value(p)?)?
                        .filter(|d| d.as_secs() >= 10)
                        .ok_or("want 10s or more")?,
                )
            }
            "--socket" => out.socket = Some(value(p)?.into()),
            "--xds" => out.xds = addr(value(p)?)?,
            "--default-mode" => {
                let v = text(value(p)?)?;
                out.default_mode =
                    Mode::parse(&v).ok_or_else(|| format!("want auto, http or tcp, not {v:?}"))?
            }
            "--sniff-timeout" => {
                out.serving.sniff_timeout = duration(value(p)?)?
                    .ok_or("a sniff timeout of zero would send everything to tcp_proxy")?
            }
            "--idle-timeout" => out.serving.idle_timeout = duration(value(p)?)?,
            "--stream-idle-timeout" => out.serving.stream_idle_timeout = duration(value(p)?)?,
            "--request-timeout" => out.serving.request_timeout = duration(value(p)?)?,
            "--max-connections" => {
                let v = text(value(p)?)?;
                out.serving.max_connections = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("want a positive number, not {v:?}"))?,
                )
            }
            "--max-request-headers-kb" => {
                let v = text(value(p)?)?;
                out.serving.max_request_headers_kb = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_REQUEST_HEADERS_KB).contains(n))
                    .ok_or_else(|| format!("want 1 to {MAX_REQUEST_HEADERS_KB} (KiB), not {v:?}"))?
            }
            "--node-id" => out.node_id = text(value(p)?)?,
            "--no-recover" => out.no_recover = true,
            "--envoy" => out.envoy = Some(value(p)?.into()),
            "--docker" => out.docker = Some(text(value(p)?)?),
            "--tracing" => out.telemetry.tracer = Some(Tracer::parse(&text(value(p)?)?)?),
            "--trace-sampling" => {
                let v = text(value(p)?)?;
                out.telemetry.sampling = v
                    .trim_end_matches('%')
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| format!("want a percentage from 0 to 100, not {v:?}"))?;
            }
            "--access-log" => {
                out.telemetry.access_log = Some(AccessLogTarget::parse(&text(value(p)?)?))
            }
            "--admin" => {
                let v = text(value(p)?)?;
                out.admin = if v == "none" {
                    None
                } else {
                    Some(Addr::parse(&v)?)
                };
            }
            "--envoy-admin" => out.envoy_admin = addr(value(p)?)?,
            "--admin-token-file" => out.admin_token_file = Some(value(p)?.into()),
            "--proxy-exe" => out.proxy_exe = Some(value(p)?.into()),
            "--nft" => {
                let v = value(p)?;
                out.nft = if v == "none" { None } else { Some(v.into()) };
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    out.fleet = fleet.finish()?;
    out.mesh = match mesh_dir {
        Some(dir) => Some(crate::registrar::mesh::Config {
            dir,
            port: mesh_port.unwrap_or(crate::registrar::mesh::DEFAULT_PORT),
            leaf_ttl: leaf_ttl.unwrap_or(crate::registrar::mesh::DEFAULT_LEAF_TTL),
        }),
        None if mesh_port.is_some() || leaf_ttl.is_some() => {
            return Err("--mesh-port and --mesh-leaf-ttl need --mesh DIR".into())
        }
        None => None,
    };
    if out.mesh.is_some() && out.fleet.is_none() {
        return Err("--mesh needs --catalog: the mesh is between the fleet's hosts".into());
    }
    Ok(if run { Parsed::Run(out) } else { Parsed::Help })
}

/// The fleet flags as given, checked together once all are read.
#[derive(Default)]
struct FleetFlags {
    etcd: Option<String>,
    advertise: Option<std::net::IpAddr>,
    host_id: Option<String>,
    egress: Option<EgressAt>,
    ttl: Option<std::time::Duration>,
}

impl FleetFlags {
    fn finish(self) -> Result<Option<FleetConfig>, String> {
        let Some(etcd) = self.etcd else {
            let stray = [
                ("--advertise", self.advertise.is_some()),
                ("--host-id", self.host_id.is_some()),
                ("--egress", self.egress.is_some()),
                ("--catalog-ttl", self.ttl.is_some()),
            ];
            return match stray.iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(format!("{flag} needs --catalog")),
                None => Ok(None),
            };
        };
        let advertise = self
            .advertise
            .ok_or("--catalog needs --advertise IP: where other hosts reach this one")?;
        let host_id = match self.host_id {
            Some(h) => h,
            None => {
                let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map_err(|e| format!("no --host-id, and no hostname: {e}"))?
                    .trim()
                    .to_string();
                crate::catalog::key("x", &h, "x").map_err(|e| {
                    format!("the hostname cannot be the host id ({e}); give --host-id")
                })?;
                h
            }
        };
        Ok(Some(FleetConfig {
            etcd,
            advertise,
            host_id,
            egress: self.egress.unwrap_or(EgressAt::DockerBridge),
            ttl: self.ttl.unwrap_or(crate::registrar::fleet::DEFAULT_TTL),
        }))
    }
}

pub fn bootstrap(args: Vec<OsString>) -> Result<Parsed<BootstrapArgs>, String> {
    let mut b = Bootstrap {
        xds: Addr::parse(DEFAULT_XDS).expect("default"),
        admin: Addr::parse(DEFAULT_ADMIN).expect("default"),
        node_id: DEFAULT_NODE_ID.into(),
        ads: AdsKind::Delta,
    };
    let mut output = None;
    let run = parse_flags(args, |name, p| {
        match name {
            "--xds" => b.xds = addr(value(p)?)?,
            "--admin" => b.admin = addr(value(p)?)?,
            "--output" | "-o" => output = Some(value(p)?.into()),
            "--node-id" => b.node_id = text(value(p)?)?,
            "--ads" => {
                b.ads = match text(value(p)?)?.as_str() {
                    "sotw" => AdsKind::Sotw,
                    "delta" => AdsKind::Delta,
                    other => return Err(format!("want sotw or delta, not {other:?}")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let out = BootstrapArgs {
        bootstrap: b,
        output,
    };
    Ok(if run { Parsed::Run(out) } else { Parsed::Help })
}

/// `envoy` from PATH, else the usual place.
fn default_envoy() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/envoy"))
}

pub fn install(args: Vec<OsString>) -> Result<Parsed<InstallArgs>, String> {
    let mut out = InstallArgs {
        prefix: "/usr/local".into(),
        systemd_dir: "/etc/systemd/system".into(),
        daemon_json: "/etc/docker/daemon.json".into(),
        envoy: PathBuf::new(),
        dry_run: false,
        apply: false,
    };
    let mut envoy = None;
    let run = parse_flags(args, |name, p| {
        match name {
            "--prefix" => out.prefix = value(p)?.into(),
            "--systemd-dir" => out.systemd_dir = value(p)?.into(),
            "--daemon-json" => out.daemon_json = value(p)?.into(),
            "--envoy" => envoy = Some(PathBuf::from(value(p)?)),
            "--dry-run" | "-n" => out.dry_run = true,
            "--apply" => out.apply = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    out.envoy = envoy.unwrap_or_else(default_envoy);
    for p in [&out.prefix, &out.envoy] {
        if !p.is_absolute() {
            return Err(format!("{} must be an absolute path", p.display()));
        }
    }
    Ok(if run { Parsed::Run(out) } else { Parsed::Help })
}

pub fn status(args: Vec<OsString>) -> Result<Parsed<StatusArgs>, String> {
    let mut out = StatusArgs {
        socket: None,
        json: false,
        fleet: false,
    };
    let run = parse_flags(args, |name, p| {
        match name {
            "--socket" => out.socket = Some(value(p)?.into()),
            "--json" => out.json = true,
            "--fleet" => out.fleet = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(if run { Parsed::Run(out) } else { Parsed::Help })
}

pub fn resync(args: Vec<OsString>) -> Result<Parsed<ResyncArgs>, String> {
    let mut out = ResyncArgs {
        socket: None,
        proxy_exe: None,
    };
    let run = parse_flags(args, |name, p| {
        match name {
            "--socket" => out.socket = Some(value(p)?.into()),
            "--proxy-exe" => out.proxy_exe = Some(value(p)?.into()),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(if run { Parsed::Run(out) } else { Parsed::Help })
}

pub fn ca(args: Vec<OsString>) -> Result<Parsed<CaArgs>, String> {
    let Some((sub, rest)) = args.split_first() else {
        return Ok(Parsed::Help);
    };
    let sub = sub.to_string_lossy().into_owned();
    if sub == "--help" || sub == "-h" {
        return Ok(Parsed::Help);
    }
    let (mut td, mut out, mut ca, mut host_id, mut days) = (None, None, None, None, None);
    let run = parse_flags(rest.to_vec(), |name, p| {
        match (sub.as_str(), name) {
            ("init", "--trust-domain") => {
                td = Some(TrustDomain::parse(&text(value(p)?)?).map_err(|e| e.to_string())?)
            }
            ("host", "--ca") => ca = Some(PathBuf::from(value(p)?)),
            ("host", "--host-id") => {
                let id = text(value(p)?)?;
                crate::mesh::check_segment("host id", &id).map_err(|e| e.to_string())?;
                host_id = Some(id)
            }
            (_, "--out") => out = Some(PathBuf::from(value(p)?)),
            (_, "--days") => {
                let n: u32 = text(value(p)?)?
                    .parse()
                    .map_err(|_| "want a whole number of days".to_string())?;
                if n == 0 {
                    return Err("want at least 1 day".into());
                }
                days = Some(n)
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if !run {
        return Ok(Parsed::Help);
    }
    let need = |what: &str| format!("ca {sub}: {what} is required");
    let out = out.ok_or_else(|| need("--out DIR"))?;
    Ok(Parsed::Run(match sub.as_str() {
        "init" => CaArgs::Init {
            trust_domain: td.ok_or_else(|| need("--trust-domain TD"))?,
            out,
            days: days.unwrap_or(crate::ca::ROOT_DAYS),
        },
        "host" => CaArgs::Host {
            ca: ca.ok_or_else(|| need("--ca DIR"))?,
            host_id: host_id.ok_or_else(|| need("--host-id ID"))?,
            out,
            days: days.unwrap_or(crate::ca::HOST_DAYS),
        },
        other => return Err(format!("ca: unknown step {other:?}; want init or host")),
    }))
}

pub const CA_HELP: &str = "\
Usage: envoy-docker ca init --trust-domain TD --out DIR [--days N]
       envoy-docker ca host --ca DIR --host-id ID --out DIR2 [--days N]

The mesh's chain of trust (see README, \"Mesh\").
  init   a new root for trust domain TD: DIR/root.pem and DIR/root.key (0600).
         Keep DIR offline; it only signs host intermediates. Default 3650 days.
  host   a host intermediate signed by the root in DIR: a CA of path length 0,
         limited to URI names under spiffe://TD/. Writes DIR2/host.pem,
         DIR2/host.key (0600) and DIR2/root.pem; copy DIR2 to host ID and start
         it with `envoy-docker serve --mesh DIR2`. Default 365 days.
Existing keys are never overwritten.

Example:
  envoy-docker ca init --trust-domain corp.internal --out /secure/mesh-root
  envoy-docker ca host --ca /secure/mesh-root --host-id web-1 --out ./web-1
  scp -r ./web-1 web-1:/etc/envoy-docker/mesh";

pub const MAIN_HELP: &str = "\
envoy-docker: serve Docker's published ports with Envoy.

Usage: envoy-docker SUBCOMMAND [FLAGS]
       docker-proxy FLAGS            (through a symlink; same as `envoy-docker proxy`)

Subcommands:
  serve       run the registrar: proxies register over a Unix socket, Envoy
              gets Listeners, Clusters and Endpoints over ADS
  proxy       the docker-proxy replacement that dockerd runs per port
  resync      replay the mappings of running proxies to the registrar
  bootstrap   print an Envoy bootstrap that points at the registrar
  status      list the registered mappings
  install     put the binary, proxy symlinks and systemd units in place
  ca          make the mesh's root (`ca init`) and host intermediates (`ca host`)
  version     print the version
  help [SUB]  print help for a subcommand

Point dockerd at the proxy in /etc/docker/daemon.json (Docker's firewall stays
on; `envoy-docker install` does this):
  { \"userland-proxy-path\": \"/usr/local/bin/docker-proxy\", \"userland-proxy\": true }
where /usr/local/bin/docker-proxy is a symlink to envoy-docker.

Example:
  envoy-docker serve &
  envoy-docker bootstrap > envoy.yaml && envoy -c envoy.yaml &
  docker run -d -p 8080:80 nginx && curl http://127.0.0.1:8080/";

pub const SERVE_HELP: &str = "\
Usage: envoy-docker serve [--socket PATH] [--xds ADDR] [--default-mode auto|http|tcp]
                          [--node-id ID] [--no-recover] [--docker URL|none]
                          [--nft PATH|none]
                          [--admin ADDR|none [--admin-token-file FILE]]
                          [--tracing otlp|zipkin=HOST:PORT]
                          [--trace-sampling PERCENT] [--access-log stdout|PATH]
                          [--envoy PATH [--envoy-admin ADDR]] [--sniff-timeout DUR]
                          [--idle-timeout DUR] [--stream-idle-timeout DUR]
                          [--request-timeout DUR] [--max-connections N]
                          [--max-request-headers-kb N]
                          [--catalog etcd=URL[,URL...] --advertise IP
                           [--host-id ID] [--egress IP|none] [--catalog-ttl DUR]
                           [--mesh DIR [--mesh-port N] [--mesh-leaf-ttl DUR]]]

Runs the registrar. Needs no flags and no config file.
  --socket PATH          registrar socket (default $ENVOY_DOCKER_SOCKET, else
                         /run/envoy-docker/registrar.sock)
  --xds ADDR             where Envoy connects for ADS: unix:PATH (made 0600,
                         root only), or IP:PORT / [IPV6]:PORT, which any local
                         user can reach (default unix:/run/envoy-docker/xds.sock)
  --default-mode MODE    auto, http or tcp, for ports without a ProxyMode or
                         ProxyMode_<port> label (default auto: HTTP/1.x and
                         h2c get HTTP stats and tracing, anything else is
                         proxied as bytes)
  --sniff-timeout DUR    how long auto mode waits for a client's first bytes
                         before it treats the connection as plain TCP: the
                         delay a server-first protocol (SMTP, MySQL) sees
                         (default 200ms)
  --node-id ID           only Envoys with this node id are served
                         (default envoy-docker)
  --no-recover           don't take the mappings of running proxies from /proc
                         at start-up; run `envoy-docker resync` instead
  --proxy-exe PATH       also trust processes running PATH as proxies (at
                         recovery and for resync); this binary always is
  --docker URL|none      the Docker API, for container names and labels:
                         unix:///PATH or tcp://HOST:PORT (default $DOCKER_HOST,
                         else unix:///var/run/docker.sock); none turns it off
  --nft PATH|none        the nft command (Debian's nftables) with which the
                         registrar claims every published port in its table
                         `inet envoy-docker`, ahead of Docker's DNAT, so that
                         published traffic reaches the proxies and Envoy with
                         Docker's iptables on (default nft, from PATH); none
                         leaves the ports to Docker's DNAT
  --admin ADDR|none      the registrar's HTTP endpoint: the dashboard (/) and
                         its JSON API (/api/v1/), /healthz, /mappings (as
                         status --json) and /metrics (Prometheus)
                         (default 127.0.0.1:18001)
  --admin-token-file F   the token (F's first line) that every request but
                         /healthz must carry, as a bearer token or the
                         password of HTTP Basic; needed, and enforced, when
                         --admin is not a loopback address
  --tracing KIND=ADDR    trace every HTTP-mode container: otlp=HOST:PORT
                         (OpenTelemetry over gRPC; each container is its own
                         service) or zipkin=HOST:PORT (v2 JSON over HTTP; the
                         service is Envoy's node cluster and the container's
                         name is in the tags). Off by default.
  --trace-sampling PCT   percent of requests traced (default 100)
  --access-log TARGET    Envoy access logs as JSON lines, to stdout or to a
                         file path; each names the container. Off by default.
  --envoy PATH           also run this Envoy binary with a generated bootstrap,
                         restart it if it dies, stop it on shutdown
  --envoy-admin ADDR     admin address of that Envoy (default 127.0.0.1:9901)

The fleet (off unless --catalog is given; see README, \"Across hosts\"):
  --catalog etcd=URLS    publish this host's services to etcd and follow the
                         others': http://IP:PORT of each member, comma-separated
  --advertise IP         where other hosts reach this host's published ports
                         (required with --catalog)
  --host-id ID           this host's name in the catalog (default the hostname)
  --egress IP|none       where containers reach fleet services, on each service
                         port (default Docker's bridge gateway; none: no egress)
  --catalog-ttl DUR      lease of this host's catalog entries (default 10s): a
                         host that dies leaves the fleet this long after

The mesh (mutual TLS between hosts; needs --catalog; see README, \"Mesh\"):
  --mesh DIR             this host's intermediate (`envoy-docker ca host`):
                         DIR/host.pem, DIR/host.key (0600), DIR/root.pem
  --mesh-port N          where other hosts' callers reach this host's services
                         (default 15443, on the --advertise address)
  --mesh-leaf-ttl DUR    lifetime of each identity's certificate (default 24h;
                         renewed between 60% and 90% of it)

Limits, none of which docker-proxy has; all are off unless set. DUR is like
250ms, 30s, 5m or 1h; 0 means no limit.
  --idle-timeout DUR     close connections idle this long (TCP and HTTP)
  --stream-idle-timeout DUR  reset HTTP requests idle this long
  --request-timeout DUR  end HTTP requests that take longer than this
  --max-connections N    connections (and HTTP requests) per published port
                         at once
  --max-request-headers-kb N  largest HTTP request header block (default and
                         most 8192)

Examples:
  envoy-docker serve --envoy /usr/local/bin/envoy
  envoy-docker serve --tracing otlp=127.0.0.1:4317 --trace-sampling 10
  envoy-docker serve --xds unix:/run/envoy-docker/xds.sock";

pub const RESYNC_HELP: &str = "\
Usage: envoy-docker resync [--socket PATH] [--proxy-exe PATH]

Finds running proxies in /proc (docker-proxy, envoy-docker-shim, or
`envoy-docker proxy`) and registers each mapping on that proxy's behalf. The
mapping then lives as long as that process. Prints one line per mapping and
exits non-zero if the registrar cannot be reached. Only processes of root
(or of the registrar's user) that run this binary, or --proxy-exe PATH, are
taken.

Example:
  envoy-docker resync";

pub const BOOTSTRAP_HELP: &str = "\
Usage: envoy-docker bootstrap [--xds ADDR] [--admin ADDR] [--node-id ID]
                              [--ads sotw|delta] [--output PATH]

Prints an Envoy v3 bootstrap (YAML) that takes everything from the registrar
over ADS and waits for it at start-up.
  --xds ADDR       the registrar's xDS address
                   (default unix:/run/envoy-docker/xds.sock)
  --admin ADDR     Envoy's admin listener (default 127.0.0.1:9901)
  --node-id ID     node id (default envoy-docker)
  --ads KIND       delta (incremental, default) or sotw (state of the
                   world, which resends every listener and cluster on each
                   change)
  --output PATH    write the file (atomically) instead of printing it

Example:
  envoy-docker bootstrap > /etc/envoy/envoy.yaml";

pub const STATUS_HELP: &str = "\
Usage: envoy-docker status [--socket PATH] [--json] [--fleet]

Lists the registered mappings: protocol, host address, container address,
mode, name, state (pending, active, or failed with Envoy's error) and the
owning proxy's pid.

With --fleet, lists every instance in the fleet's catalog instead: service,
host, address, health, mode, service port and container, after a line on
this host and on etcd.

Example:
  envoy-docker status --json";

pub const INSTALL_HELP: &str = "\
Usage: envoy-docker install [--prefix DIR] [--systemd-dir DIR] [--daemon-json PATH]
                            [--envoy PATH] [--dry-run] [--apply]

Copies this binary to PREFIX/bin/envoy-docker, links PREFIX/bin/docker-proxy
and PREFIX/bin/envoy-docker-shim to it, writes envoy-docker.service and
envoy-docker-envoy.service, and prints the daemon.json keys dockerd needs:
userland-proxy-path and \"userland-proxy\": true. daemon.json is only changed
with --apply, which merges the keys in, keeps every other key, and saves the
old file next to it.

Docker's firewall stays as it is. With \"iptables\": true (Docker's default),
containers keep their outbound NAT and the isolation between networks, and
the registrar claims every published port in nftables (table inet
envoy-docker, `serve --nft`) ahead of Docker's DNAT, so that published traffic
still reaches the proxies and Envoy. With \"iptables\": false (the old setup,
left alone if daemon.json has it), every published packet reaches the proxies
anyway, but containers lose outbound NAT and network isolation; install says
so when it sees it.
  --prefix DIR         install root for bin/ (default /usr/local)
  --systemd-dir DIR    where the units go (default /etc/systemd/system)
  --daemon-json PATH   dockerd's config (default /etc/docker/daemon.json)
  --envoy PATH         the Envoy the Envoy unit runs (default: envoy on PATH)
  --dry-run            print every file it would write; write nothing
  --apply              also merge the keys into daemon.json

Example:
  envoy-docker install --dry-run
  envoy-docker install --apply && systemctl daemon-reload \
    && systemctl enable --now envoy-docker envoy-docker-envoy && systemctl restart docker";

pub const VERSION_HELP: &str = "\
Usage: envoy-docker version   (also --version, and docker-proxy -v)

Prints the version, the git commit and the Envoy API it speaks.

Example:
  envoy-docker version";

pub fn help_for(applet: Applet) -> &'static str {
    match applet {
        Applet::Proxy => crate::cmdline::USAGE,
        Applet::Serve => SERVE_HELP,
        Applet::Resync => RESYNC_HELP,
        Applet::Bootstrap => BOOTSTRAP_HELP,
        Applet::Status => STATUS_HELP,
        Applet::Version => VERSION_HELP,
        Applet::Install => INSTALL_HELP,
        Applet::Ca => CA_HELP,
        Applet::Help => MAIN_HELP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn serve_defaults_and_flags() {
        let Parsed::Run(a) = serve(v(&[])).unwrap() else {
            panic!()
        };
        assert_eq!(a.xds.to_string(), "unix:/run/envoy-docker/xds.sock");
        assert_eq!(a.default_mode, Mode::Auto);
        assert_eq!(a.serving, Serving::default());
        assert_eq!(a.node_id, "envoy-docker");
        let Parsed::Run(a) = serve(v(&[
            "--xds=unix:/tmp/x",
            "--default-mode",
            "tcp",
            "--no-recover",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.xds, Addr::Unix("/tmp/x".into()));
        assert_eq!(a.default_mode, Mode::Tcp);
        assert!(a.no_recover);
        assert_eq!(a.admin_token_file, None);
        let Parsed::Run(a) = serve(v(&[
            "--admin",
            "0.0.0.0:18001",
            "--admin-token-file",
            "/etc/t",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.admin_token_file, Some("/etc/t".into()));
        assert!(serve(v(&["--admin-token-file"])).is_err());
        assert!(serve(v(&["--default-mode", "udp"])).is_err());
        let Parsed::Run(a) = serve(v(&[
            "--sniff-timeout=50ms",
            "--idle-timeout",
            "1h",
            "--stream-idle-timeout=5m",
            "--request-timeout=0",
            "--max-connections=1024",
            "--max-request-headers-kb=60",
        ]))
        .unwrap() else {
            panic!()
        };
        let s = a.serving;
        assert_eq!(s.sniff_timeout, std::time::Duration::from_millis(50));
        assert_eq!(s.idle_timeout, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(
            s.stream_idle_timeout,
            Some(std::time::Duration::from_secs(300))
        );
        assert_eq!((s.request_timeout, s.max_connections), (None, Some(1024)));
        assert_eq!(s.max_request_headers_kb, 60);
        for bad in [
            &["--sniff-timeout", "0"][..],
            &["--idle-timeout", "soon"],
            &["--max-connections", "0"],
            &["--max-request-headers-kb", "9000"],
        ] {
            assert!(serve(v(bad)).unwrap_err().contains(bad[0]), "{bad:?}");
        }
        assert!(serve(v(&["--bogus"])).unwrap_err().contains("--bogus"));
        assert!(matches!(serve(v(&["--help"])).unwrap(), Parsed::Help));
    }

    #[test]
    fn fleet_flags_are_off_by_default_and_checked_together() {
        let Parsed::Run(a) = serve(v(&[])).unwrap() else {
            panic!()
        };
        assert_eq!(a.fleet, None);
        let Parsed::Run(a) = serve(v(&[
            "--catalog",
            "etcd=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--advertise=10.0.0.5",
            "--host-id",
            "node-5",
            "--egress",
            "none",
            "--catalog-ttl=30s",
        ]))
        .unwrap() else {
            panic!()
        };
        let f = a.fleet.unwrap();
        assert_eq!(f.etcd, "http://10.0.0.1:2379,http://10.0.0.2:2379");
        assert_eq!(f.advertise.to_string(), "10.0.0.5");
        assert_eq!(f.host_id, "node-5");
        assert_eq!(f.egress, EgressAt::Off);
        assert_eq!(f.ttl, std::time::Duration::from_secs(30));
        let Parsed::Run(a) = serve(v(&[
            "--catalog=etcd=http://10.0.0.1:2379",
            "--advertise=10.0.0.5",
            "--egress=172.17.0.1",
        ]))
        .unwrap() else {
            panic!()
        };
        let f = a.fleet.unwrap();
        assert_eq!(f.egress, EgressAt::At("172.17.0.1".parse().unwrap()));
        assert_eq!(f.ttl, crate::registrar::fleet::DEFAULT_TTL);
        assert!(!f.host_id.is_empty(), "the hostname");
        let etcd = "--catalog=etcd=http://10.0.0.1:2379";
        for (bad, why) in [
            (&[etcd][..], "needs --advertise"),
            (&["--advertise=10.0.0.5"], "needs --catalog"),
            (&["--egress=none"], "needs --catalog"),
            (&["--catalog=consul=x"], "want etcd="),
            (
                &["--catalog=etcd=https://10.0.0.1:2379"],
                "bad etcd endpoint",
            ),
            (&[etcd, "--advertise=127.0.0.1"], "cannot be reached"),
            (&[etcd, "--advertise=0.0.0.0"], "cannot be reached"),
            (&[etcd, "--advertise=10.0.0.5", "--host-id=a/b"], "segment"),
            (
                &[etcd, "--advertise=10.0.0.5", "--catalog-ttl=1s"],
                "2s or more",
            ),
            (
                &[etcd, "--advertise=10.0.0.5", "--egress=gw"],
                "IP address or none",
            ),
        ] {
            let e = serve(v(bad)).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ca_steps_and_their_required_flags() {
        let Parsed::Run(CaArgs::Init {
            trust_domain, days, ..
        }) = ca(v(&["init", "--trust-domain", "corp", "--out", "d"])).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (trust_domain.as_str(), days),
            ("corp", crate::ca::ROOT_DAYS)
        );
        let Parsed::Run(CaArgs::Host { host_id, days, .. }) = ca(v(&[
            "host",
            "--ca",
            "d",
            "--host-id",
            "h1",
            "--out",
            "e",
            "--days",
            "7",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!((host_id.as_str(), days), ("h1", 7));
        for bad in [
            &["init", "--out", "d"][..],
            &["init", "--trust-domain", "Bad/TD", "--out", "d"],
            &["host", "--ca", "d", "--host-id", "a/b", "--out", "e"],
            &["host", "--trust-domain", "x", "--out", "e"],
            &["sign", "--out", "e"],
            &[
                "init",
                "--trust-domain",
                "corp",
                "--out",
                "d",
                "--days",
                "0",
            ],
        ] {
            assert!(ca(v(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_help_text_has_an_example() {
        for applet in [
            Applet::Proxy,
            Applet::Serve,
            Applet::Resync,
            Applet::Bootstrap,
            Applet::Status,
            Applet::Install,
            Applet::Ca,
            Applet::Version,
            Applet::Help,
        ] {
            let text = help_for(applet);
            assert!(text.contains("Example"), "{applet:?} help has no example");
            assert!(
                text.starts_with("Usage") || applet == Applet::Help,
                "{applet:?}"
            );
        }
    }

    #[test]
    fn bootstrap_flags() {
        let Parsed::Run(a) = bootstrap(v(&["--ads", "delta", "--admin", "[::1]:9000"])).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.bootstrap.ads, AdsKind::Delta);
        assert_eq!(a.bootstrap.admin.to_string(), "[::1]:9000");
        assert!(bootstrap(v(&["--ads", "rest"])).is_err());
        assert!(bootstrap(v(&["--xds", "nowhere"])).is_err());
    }
}
