//! `envoy-docker serve`: the registrar daemon.
//!
//! Start-up order keeps Envoy safe across restarts:
//! 1. bind the registrar socket and the xDS address (fail fast if taken);
//! 2. recover: take the mappings of every live proxy from /proc, the same
//!    scan as `resync` (skipped with `--no-recover`);
//! 3. serve proxies at once; follow Docker, and wait (5 s at most) for its
//!    container list, so that names and modes are in place;
//! 4. only then serve Envoys. An Envoy therefore never hears a state that
//!    lacks listeners of proxies that are still alive.
//!
//! Mappings held for a pid (recovered, or replayed by resync) end when that
//! process exits, seen through a pidfd (`liveness`), with a slow /proc check
//! behind it; connected proxies are noticed at once when their socket
//! closes, and are never dropped by pid.

pub mod admin;
pub mod claims;
pub mod control;
pub mod dashboard;
pub mod docker;
pub mod envoy;
pub mod fleet;
pub mod keeper;
pub mod liveness;
pub mod mesh;
pub mod metrics;
pub mod naming;
pub mod notify;
pub mod socket;
pub mod state;

use crate::addr::Addr;
use crate::mapping::Mode;
use crate::mapping::Server;
use crate::xds::server::XdsListener;
use crate::xds::serving::Serving;
use crate::xds::telemetry::Telemetry;
use keeper::{Input, Registrar};
use liveness::OwnerProcess;
use state::{Arrival, Registry, RECONNECT_GRACE};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

/// What `serve` runs with; `cli` fills it from the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub xds: Addr,
    pub default_mode: Mode,
    pub node_id: String,
    /// Skip the /proc scan at start-up (then `resync` restores mappings).
    pub no_recover: bool,
    /// Run and supervise this Envoy binary.
    pub envoy: Option<PathBuf>,
    /// `--docker URL|none`; `None` means `$DOCKER_HOST` or the default.
    pub docker: Option<String>,
    /// Tracing, sampling and access logs for Envoy.
    pub telemetry: Telemetry,
    /// Auto mode's sniff timeout and the operator's limits.
    pub serving: Serving,
    /// The registrar's own HTTP endpoint; `None` with `--admin none`.
    pub admin: Option<Addr>,
    /// The token a non-loopback admin address asks for.
    pub admin_token_file: Option<PathBuf>,
    /// The supervised Envoy's admin address.
    pub envoy_admin: Addr,
    /// Another executable whose processes may own mappings, besides this
    /// binary (`--proxy-exe`).
    pub proxy_exe: Option<PathBuf>,
    /// Publishing to and following the fleet's catalog (`--catalog`).
    pub fleet: Option<fleet::Config>,
    /// Mutual TLS between the fleet's hosts (`--mesh`); needs `fleet`.
    pub mesh: Option<mesh::Config>,
    /// The nft command that claims published ports (`--nft`); `None`
    /// leaves them to Docker's DNAT.
    pub nft: Option<PathBuf>,
}

/// The slow safety net behind the pidfd watches (see `liveness`).
const REAP_EVERY: Duration = Duration::from_secs(5);
/// How long start-up waits for Docker's container list.
const DOCKER_SYNC_BUDGET: Duration = Duration::from_secs(5);

/// Why the registrar could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] crate::addr::ListenError),
    #[error(transparent)]
    AdminToken(#[from] dashboard::auth::TokenError),
    #[error("--docker")]
    Docker(#[source] docker::client::DockerError),
    #[error("--catalog")]
    Etcd(#[from] crate::etcd::Error),
    #[error("--mesh")]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("--mesh needs --catalog: the mesh is between the fleet's hosts")]
    MeshWithoutFleet,
    #[error("--mesh: the intermediate is for host {ca:?}, but this host is {host:?} (--host-id)")]
    MeshHostId { ca: String, host: String },
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
    #[error("the xDS server failed")]
    Xds(#[source] tonic::transport::Error),
}

/// The role's entry, on the runtime `lib::run` built: what belongs to the
/// process (logging, the open-file limit, the kernel switch, signals),
/// then [`run`].
pub async fn main(config: Config) -> Result<std::process::ExitCode, Error> {
    crate::logging::init();
    crate::fdlimit::raise();
    let listeners = Listeners::bind(&config).await?;
    migrate_queued_connections();
    let stop = signals().map_err(Error::Signals)?;
    run(config, listeners, stop).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
fn signals() -> std::io::Result<impl Future<Output = ()>> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    })
}

/// Everything the registrar listens on, bound before anything else so that
/// a taken address fails start-up at once.
pub struct Listeners {
    socket: UnixListener,
    socket_path: PathBuf,
    xds: XdsListener,
    admin: Option<(tokio::net::TcpListener, dashboard::auth::Token)>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, Error> {
        let socket_path = crate::addr::socket_path(config.socket.clone());
        let socket = socket::bind(&socket_path)?;
        let xds = XdsListener::bind(&config.xds).await?;
        let admin = match &config.admin {
            Some(a) => {
                let l = admin::bind(a).await?;
                // The address as bound: `--admin` may name a host.
                let at = l.local_addr().map_err(|e| {
                    crate::addr::ListenError::io("the admin endpoint", &a.to_string())(e)
                })?;
                let token =
                    dashboard::auth::Token::for_addr(at, config.admin_token_file.as_deref())?;
                Some((l, token))
            }
            None => None,
        };
        Ok(Listeners {
            socket,
            socket_path,
            xds,
            admin,
        })
    }

    /// Where the admin endpoint listens (port 0 in `--admin` picks one).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

/// Serves until `shutdown` resolves. Runs inside any tokio runtime, so a
/// test can run a registrar in its own process. Everything it starts ends
/// with it: its tasks, listeners and socket files.
pub async fn run(
    args: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let Listeners {
        socket: unix,
        socket_path: path,
        xds,
        admin,
    } = listeners;
    // Whatever fails below, the socket file goes when this returns.
    let _socket_file = RemoveOnDrop(path.clone());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ports_tx, ports) = tokio::sync::watch::channel(crate::nft::PortsState::Starting);
    let etcd = match &args.fleet {
        Some(f) => Some(crate::etcd::Etcd::connect(&f.etcd).await?),
        None => None,
    };
    let mut registry = Registry::new(args.default_mode)
        .with_options(args.telemetry.clone(), args.serving.clone())
        .with_ports_state(ports);
    if let Some(f) = &args.fleet {
        registry = registry.with_fleet(f.host_id.clone(), f.advertise);
    }
    let mesh = match (&args.mesh, &args.fleet) {
        (None, _) => None,
        (Some(_), None) => return Err(Error::MeshWithoutFleet),
        (Some(m), Some(f)) => {
            let ca = crate::mesh::check::load_host(&m.dir)?;
            if ca.host_id != f.host_id {
                return Err(Error::MeshHostId {
                    ca: ca.host_id,
                    host: f.host_id.clone(),
                });
            }
            let listen = std::net::SocketAddr::new(f.advertise, m.port);
            tracing::info!(
                "mesh: trust domain {}, this host is {}, mesh port {listen}, leaves for {}s",
                ca.trust_domain.as_str(),
                ca.trust_domain.host(&ca.host_id),
                m.leaf_ttl.as_secs()
            );
            let mesh = crate::xds::mesh::Mesh {
                trust_domain: ca.trust_domain.clone(),
                listen,
                trust: crate::xds::mesh::trust_name(&ca.root_pem),
            };
            registry = registry.with_mesh(mesh, ca.host_id.clone(), &ca.root_pem);
            Some((ca.signer, m.leaf_ttl))
        }
    };
    let trust = std::sync::Arc::new(crate::procscan::Trust::new(args.proxy_exe.as_deref()));
    if args.no_recover {
        tracing::info!("not recovering mappings (--no-recover)");
    } else {
        recover(&mut registry, &path, &trust);
    }

    // Everything below runs in `tasks`, which aborts what is left of it
    // when the run ends.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let wanted = registry.claims();
    let snapshots = registry.snapshots();
    let instances = registry.fleet_instances();
    let mesh_wanted = registry.mesh_wanted();
    let (registrar, inputs) = keeper::handle(&registry);
    tasks.spawn(keeper::run(registry, inputs, stop.clone()));
    if let (Some((signer, ttl)), Some(wanted)) = (mesh, mesh_wanted) {
        tasks.spawn(mesh::run(
            signer,
            ttl,
            registrar.clone(),
            wanted,
            stop.clone(),
        ));
    }

    // The table is rebuilt from what was just recovered, sweeping claims
    // of proxies that died while no registrar ran.
    let (applied_tx, mut applied) = tokio::sync::watch::channel(None);
    tasks.spawn(claims::run(
        args.nft.clone().map(crate::nft::Nft::new),
        wanted,
        claims::Reports {
            state: ports_tx,
            applied: applied_tx,
        },
        stop.clone(),
    ));
    let on_claims = registrar.clone();
    tasks.spawn(async move {
        while applied.changed().await.is_ok() {
            let now = applied.borrow_and_update().clone();
            on_claims.tell(Input::ClaimsApplied(now));
        }
    });

    // Docker metadata: names and modes must be in place before any Envoy
    // hears about the recovered mappings, or they would change under it.
    let docker = docker::client::Docker::from_setting(args.docker.as_deref())
        .map_err(Error::Docker)?
        .map(std::sync::Arc::new);
    // Proxies are taken at once, before Docker has answered: their names
    // arrive later, as they do for any new container. No Envoy hears of
    // anything before the sync below.
    tasks.spawn(socket::serve(
        unix,
        registrar.clone(),
        docker.clone().map(naming::Namer::new),
        trust,
    ));
    match &docker {
        Some(d) => {
            let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
            tasks.spawn(docker::watch(d.clone(), registrar.clone(), synced_tx));
            let _ = tokio::time::timeout(DOCKER_SYNC_BUDGET, synced.wait_for(|s| *s)).await;
        }
        None => tracing::info!("not following Docker (--docker none)"),
    }

    tasks.spawn(reap(registrar.clone()));
    let after_grace = registrar.clone();
    tasks.spawn(async move {
        tokio::time::sleep(RECONNECT_GRACE).await;
        after_grace.tell(Input::GraceOver);
    });
    if let Some((l, token)) = admin {
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        match token.required() {
            true => tracing::info!(
                "dashboard and API on http://{at}/: not loopback, so every request but /healthz needs the token from --admin-token-file"
            ),
            false => tracing::info!("dashboard and API on http://{at}/ (loopback: no token)"),
        }
        let dash =
            dashboard::Dashboard::start(registrar.clone(), args.envoy_admin.clone(), &mut tasks);
        tasks.spawn(admin::serve(l, registrar.clone(), dash, token));
    }
    tracing::info!(
        "serving proxies on {} and xDS on {} (node id {:?})",
        path.display(),
        args.xds,
        args.node_id
    );

    // After the Docker sync: the instances published first carry their
    // names, so a restarted registrar replaces its old keys with the same.
    let fleet = match (args.fleet.clone(), etcd, instances) {
        (Some(f), Some(etcd), Some(local)) => Some(tokio::spawn(fleet::run(
            f,
            etcd,
            registrar.clone(),
            local,
            docker.clone(),
            stop.clone(),
        ))),
        _ => None,
    };
    let supervisor = args.envoy.clone().map(|envoy| {
        let sup = envoy::Supervisor {
            envoy,
            bootstrap: envoy::bootstrap_for(&args.xds, &args.node_id, args.envoy_admin.clone()),
            config: path.with_file_name("envoy.yaml"),
        };
        tokio::spawn(sup.run(stop.clone()))
    });

    let mut stopped = stop.clone();
    let xds_shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    registrar.tell(Input::ServingEnvoys);
    notify::notify(&format!("READY=1\nSTATUS=serving xDS on {}", args.xds));
    let control = control::Envoys::new(registrar.clone());
    let result = xds
        .serve(control, snapshots, args.node_id, xds_shutdown)
        .await;
    notify::notify("STOPPING=1");
    if let Some(sup) = supervisor {
        let _ = sup.await;
    }
    if let Some(f) = fleet {
        // Revoking the lease takes one etcd call; a dead etcd costs its
        // time limit per member, at most.
        let _ = tokio::time::timeout(Duration::from_secs(8), f).await;
    }
    // The proxy socket, Docker watch, admin, claims, timers and the
    // registry's own task end here.
    tasks.shutdown().await;
    result.map_err(Error::Xds)
}

/// Removes a socket file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the kernel's switch for moving queued connections lives.
const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` (Linux 5.14+). When a proxy hands
/// its port over and closes its socket, connections still queued on it then
/// move to Envoy's sockets in the same reuse-port group instead of being
/// reset. Without it a hand-over can drop the few connections in flight.
fn migrate_queued_connections() {
    match std::fs::read_to_string(MIGRATE_SYSCTL) {
        Ok(v) if v.trim() == "1" => {
            tracing::info!("net.ipv4.tcp_migrate_req is 1: queued connections move on hand-over")
        }
        Ok(_) => match std::fs::write(MIGRATE_SYSCTL, "1") {
            Ok(()) => tracing::info!(
                "set net.ipv4.tcp_migrate_req=1, so queued connections move to Envoy on hand-over"
            ),
            Err(e) => tracing::warn!(
                "cannot set net.ipv4.tcp_migrate_req=1 ({e}): a hand-over may reset connections queued at that moment"
            ),
        },
        Err(e) => tracing::warn!(
            "{MIGRATE_SYSCTL}: {e} (Linux older than 5.14?): a hand-over may reset connections queued at that moment"
        ),
    }
}

/// Takes the mappings of live proxies from /proc.
fn recover(registry: &mut Registry, socket: &std::path::Path, trust: &crate::procscan::Trust) {
    let found = crate::procscan::scan(socket, trust);
    for p in &found {
        let arrival = Arrival {
            mapping: p.mapping,
            owner: OwnerProcess::of(p.pid),
            conn: None,
            server: Server::Relay,
            meta: None,
        };
        if let Err(e) = registry.register(arrival) {
            tracing::warn!("recovering {} (pid {}): {e}", p.mapping, p.pid);
        }
    }
    tracing::info!("recovered {} mapping(s) from running proxies", found.len());
}

async fn reap(registrar: Registrar) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        registrar.tell(Input::Reap);
    }
}
