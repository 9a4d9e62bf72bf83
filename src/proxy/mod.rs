//! The proxy role: what dockerd runs once per published port and address
//! family, in place of docker-proxy. It owns the port's socket for the
//! mapping's whole life and lends it to Envoy.
//!
//! Start-up, which `docker run` waits for, never depends on the registrar
//! or on Envoy:
//! 1. take fd 3 (the readiness pipe) and, with `-use-listen-fd`, fd 4,
//!    before anything else can open a descriptor;
//! 2. parse docker-proxy's flags; bad flags are reported on fd 3;
//! 3. get the socket: fd 4 as dockerd 28+ made it, or bind it here as
//!    docker-proxy does (a conflict is `1\n<error>` at once); either way
//!    with `SO_REUSEPORT`, so Envoy can bind beside it;
//! 4. TCP: register and wait, at most [`START_BUDGET`], for the registrar's
//!    hand-over order (every connected Envoy listens on the port). Then
//!    write `0\n` and close the socket, or, without the order, write `0\n`
//!    and relay. An unreachable registrar means `0\n` at once, and so does
//!    the registrar's `Serve(Relay)`, which it sends when there is no Envoy
//!    or when registrations come in a burst (a port range; see
//!    `registrar::state::burst`): the port is handed over a moment later.
//!    UDP: write `0\n` at once and relay; registering is only for `status`.
//! 5. live as long as the mapping: follow the registrar's orders (hand over,
//!    take back; see `handover`), register again whenever the registrar
//!    comes back, and on SIGINT or SIGTERM close the port and exit 0 at
//!    once (the registrar removes the mapping when the connection closes).
//!    While the registrar is gone after a hand-over, ask the kernel every
//!    100 ms whether anything still listens on the port (`listening`), and
//!    take it back if Envoy died too.
//!
//! The proxy runs once per published port, so it stays small: one thread
//! for TCP (plus two relay threads for UDP, see `udp`), and no log
//! subscriber (its few messages go straight to stderr).

pub mod handover;
pub mod link;
pub mod listen;
pub mod listening;
pub mod say;
pub mod status;
pub mod tcp;
pub mod trim;
pub mod udp;

use crate::cmdline::{self as flags, Command, ProxyFlags};
use crate::mapping::{Mapping, Proto, Server};
use crate::proxy::say::say;
use handover::{Action, Event, Handover, Phase};
use link::{Failure, Link};
use status::StatusPipe;
use std::ffi::OsString;
use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a starting TCP proxy waits for Envoy to take the port over
/// before it reports ready and relays by itself.
pub const START_BUDGET: Duration = Duration::from_secs(1);
/// Overrides [`START_BUDGET`], in milliseconds.
pub const START_BUDGET_ENV: &str = "ENVOY_DOCKER_HANDOVER_WAIT_MS";
/// The longest pause between two attempts to reach the registrar.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long after a new relayed connection the proxy reports its count:
/// at most one report per period, and none while nothing is relayed.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How long the proxy must be left alone (no registration, no order)
/// before it gives back the code pages it no longer needs (see `trim`).
const SETTLE: Duration = Duration::from_secs(2);
/// How soon a take-back whose bind failed is tried again.
const RELAY_RETRY: Duration = Duration::from_millis(100);

const LISTEN_FD: i32 = 4;

/// A proxy that has its flags, its status pipe and (with
/// `-use-listen-fd`) its socket, ready to serve on a runtime.
pub struct Prepared {
    flags: ProxyFlags,
    listen_fd: Option<OwnedFd>,
    status: StatusPipe,
}

impl Prepared {
    /// Says on the status pipe that the proxy cannot start, as
    /// docker-proxy does; dockerd shows the text.
    pub fn fail(mut self, why: &str) -> ExitCode {
        self.status.fail(why);
        ExitCode::FAILURE
    }

    pub async fn serve(self) -> ExitCode {
        ExitCode::from(serve(self.flags, self.listen_fd, self.status).await)
    }
}

/// The proxy role's first step, before any runtime: takes fd 3 (and fd 4)
/// and reads the flags. Errors go to dockerd on fd 3, not to stderr: that
/// is docker-proxy's contract. `Err` is the exit status of a proxy that is
/// done (it printed its version or usage, or failed).
pub fn prepare(args: &[OsString]) -> Result<Prepared, ExitCode> {
    let mut status = StatusPipe::take();
    let flags = match flags::parse(args) {
        Ok(Command::Run(f)) => f,
        Ok(Command::Version) => {
            println!("{}", crate::version::line());
            return Err(ExitCode::SUCCESS);
        }
        Ok(Command::Help) => {
            println!("{}", flags::USAGE);
            return Err(ExitCode::SUCCESS);
        }
        Err(e) => {
            status.fail(&e);
            return Err(ExitCode::FAILURE);
        }
    };
    let listen_fd = if flags.use_listen_fd {
        match take_listen_fd() {
            Some(fd) => Some(fd),
            None => {
                status.fail("-use-listen-fd was given but fd 4 is not open");
                return Err(ExitCode::FAILURE);
            }
        }
    } else {
        None
    };
    Ok(Prepared {
        flags,
        listen_fd,
        status,
    })
}

fn take_listen_fd() -> Option<OwnedFd> {
    // SAFETY: only asks whether fd 4 exists.
    let open = unsafe { nix::libc::fcntl(LISTEN_FD, nix::libc::F_GETFD) } != -1;
    // SAFETY: with -use-listen-fd, dockerd gives fd 4 to the proxy alone.
    open.then(|| unsafe { OwnedFd::from_raw_fd(LISTEN_FD) })
}

async fn serve(flags: ProxyFlags, listen_fd: Option<OwnedFd>, mut status: StatusPipe) -> u8 {
    let mapping = flags.mapping;
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            status.fail(&format!("cannot handle signals: {e}"));
            return 1;
        }
    };
    let addr = mapping.key.host_addr();
    let mut port = match mapping.key.proto {
        Proto::Sctp => {
            status.fail("SCTP is not supported by envoy-docker; publish this port as tcp or udp");
            return 1;
        }
        Proto::Tcp => {
            let sock = match listen_fd {
                Some(fd) => listen::adopt(fd),
                None => listen::bind_exclusive(addr),
            };
            match sock {
                Ok(l) => Port::tcp(l, mapping),
                Err(e) => {
                    status.fail(&format!("listen tcp {addr}: bind: {e}"));
                    return 1;
                }
            }
        }
        Proto::Udp => {
            let sock = match listen_fd {
                Some(fd) => udp::adopt(fd),
                None => udp::bind_host(addr),
            };
            match sock.and_then(|s| udp::start(s, mapping.backend.addr())) {
                Ok(()) => {
                    status.ready();
                    Port::Udp
                }
                Err(e) => {
                    status.fail(&format!("listen udp {addr}: bind: {e}"));
                    return 1;
                }
            }
        }
    };
    let path = crate::addr::socket_path(None);
    // On a signal the port closes and the process exits at once, as
    // docker-proxy does; the registrar sees the connection close and
    // removes the mapping, so `docker stop` never waits on it.
    tokio::select! {
        _ = port.live(&path, mapping, &mut status) => {}
        _ = stop(&mut sigint, &mut sigterm) => {}
    };
    port.close();
    0
}

async fn stop(sigint: &mut Signal, sigterm: &mut Signal) {
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
}

/// What the proxy serves the port with.
enum Port {
    /// Always relayed in-process; the relay task runs on its own.
    Udp,
    Tcp(TcpPort),
}

struct TcpPort {
    mapping: Mapping,
    machine: Handover,
    /// The socket while it is held but not accepted on (starting).
    held: Option<StdTcpListener>,
    relay: Option<tcp::Relay>,
    relayed: Arc<tcp::Relayed>,
}

type Attempt = Pin<Box<dyn Future<Output = Result<Link, Failure>>>>;

impl Port {
    fn tcp(l: StdTcpListener, mapping: Mapping) -> Port {
        Port::Tcp(TcpPort {
            mapping,
            machine: Handover::default(),
            held: Some(l),
            relay: None,
            relayed: Arc::default(),
        })
    }

    fn server(&self) -> Server {
        match self {
            Port::Udp => Server::Relay,
            Port::Tcp(t) => t.machine.server(),
        }
    }

    fn relayed(&self) -> u64 {
        match self {
            Port::Udp => 0,
            Port::Tcp(t) => t.relayed.get(),
        }
    }

    /// Serves until the caller stops it. Never returns by itself.
    async fn live(&mut self, path: &std::path::Path, mapping: Mapping, status: &mut StatusPipe) {
        let path: PathBuf = path.to_path_buf();
        let attempt_after = |pause: Duration, server: Server| -> Attempt {
            let path = path.clone();
            Box::pin(async move {
                tokio::time::sleep(pause).await;
                Link::register(&path, mapping, server).await
            })
        };
        let mut attempt: Option<Attempt> = Some(attempt_after(Duration::ZERO, self.server()));
        let mut link: Option<Link> = None;
        let mut pause = Duration::from_millis(50);
        let mut said = false;
        let budget = start_budget();
        let deadline = tokio::time::sleep(budget);
        tokio::pin!(deadline);
        let mut retry_relay: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // Reports wait on the relay's own wake-up, so an idle proxy has no
        // timer at all: it sleeps in the kernel until something happens.
        let counter = match &*self {
            Port::Tcp(t) => Some(t.relayed.clone()),
            Port::Udp => None,
        };
        let mut report_at: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut reported = 0u64;
        let mut settle: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // Asked only while the registrar is gone and Envoy alone held the
        // port: an idle proxy with a registrar never wakes for it.
        let mut check = tokio::time::interval(listening::CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check_failed = false;
        loop {
            let starting = matches!(self, Port::Tcp(t) if t.machine.phase() == Phase::Starting);
            let orphaned =
                link.is_none() && matches!(self, Port::Tcp(t) if t.machine.phase() == Phase::Envoy);
            let event = tokio::select! {
                _ = &mut deadline, if starting => Some(Event::Deadline),
                r = pending_or(&mut attempt) => {
                    attempt = None;
                    match r {
                        Ok(mut l) => {
                            if said {
                                say(&format!("registered {mapping} again"));
                            }
                            said = false;
                            pause = Duration::from_millis(50);
                            // Who serves may have changed while connecting.
                            reported = self.relayed();
                            l.report(self.server(), reported).await;
                            link = Some(l);
                            settle = Some(Box::pin(tokio::time::sleep(SETTLE)));
                            None
                        }
                        Err(f) => {
                            if !said {
                                say(&format!("{mapping}: {}; relaying and retrying", f.text()));
                                said = true;
                            }
                            attempt = Some(attempt_after(pause, self.server()));
                            pause = (pause * 2).min(RETRY_MAX);
                            matches!(f, Failure::Unreachable(_)).then_some(Event::Unreachable)
                        }
                    }
                }
                order = next_order(&mut link) => match order {
                    Some(s) => Some(Event::Serve(s)),
                    None => {
                        say(&format!("lost the registrar at {}; registering again", path.display()));
                        link = None;
                        attempt = Some(attempt_after(Duration::ZERO, self.server()));
                        None
                    }
                },
                _ = pending_or(&mut retry_relay) => {
                    retry_relay = None;
                    if let Port::Tcp(t) = &mut *self {
                        if let Err(e) = t.start_relay() {
                            say(&format!("{mapping}: cannot take the port back yet: {e}"));
                            retry_relay = Some(Box::pin(tokio::time::sleep(RELAY_RETRY)));
                        }
                    }
                    None
                }
                _ = check.tick(), if orphaned => match listening::ask(mapping.key.host_addr()) {
                    Ok(listening::Answer::Listening) => None,
                    Ok(listening::Answer::Nobody) => {
                        say(&format!("{mapping}: nobody listens on the port and the registrar is gone; taking it back"));
                        Some(Event::Unserved)
                    }
                    Err(e) => {
                        if !check_failed {
                            say(&format!("{mapping}: cannot ask the kernel who listens on the port: {e}"));
                            check_failed = true;
                        }
                        None
                    }
                },
                _ = relay_changed(&counter), if report_at.is_none() => {
                    report_at = Some(Box::pin(tokio::time::sleep(REPORT_EVERY)));
                    None
                }
                _ = pending_or(&mut report_at) => {
                    report_at = None;
                    let now = self.relayed();
                    if let (Some(l), true) = (link.as_mut(), now != reported) {
                        reported = now;
                        l.report(self.server(), now).await;
                    }
                    None
                }
                _ = pending_or(&mut settle) => {
                    settle = None;
                    trim::soon();
                    None
                }
            };
            let (Some(event), Port::Tcp(t)) = (event, &mut *self) else {
                continue;
            };
            settle = Some(Box::pin(tokio::time::sleep(SETTLE)));
            for action in t.machine.on(event) {
                match action {
                    Action::Ready => status.ready(),
                    Action::Relay => {
                        if let Err(e) = t.start_relay() {
                            say(&format!(
                                "{mapping}: cannot take the port back: {e}; retrying"
                            ));
                            retry_relay = Some(Box::pin(tokio::time::sleep(RELAY_RETRY)));
                        }
                    }
                    Action::Close => t.close(),
                    Action::Report(server) => {
                        if let Some(l) = link.as_mut() {
                            reported = t.relayed.get();
                            l.report(server, reported).await;
                        }
                    }
                }
            }
        }
    }

    fn close(&mut self) {
        if let Port::Tcp(t) = self {
            t.close();
        }
    }
}

impl TcpPort {
    /// Relays on the socket held since start-up, or on a fresh one.
    fn start_relay(&mut self) -> std::io::Result<()> {
        if self.relay.is_some() {
            return Ok(());
        }
        let listener = match self.held.take() {
            Some(l) => l,
            None => listen::bind_shared(self.mapping.key.host_addr())?,
        };
        self.relay = Some(tcp::Relay::start(
            listener,
            self.mapping.backend.addr(),
            self.relayed.clone(),
        )?);
        Ok(())
    }

    /// Stops accepting and lets go of the socket.
    fn close(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        self.held = None;
    }
}

fn start_budget() -> Duration {
    std::env::var(START_BUDGET_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(START_BUDGET)
}

/// Awaits the future if there is one; otherwise never resolves.
async fn pending_or<F: Future + ?Sized>(f: &mut Option<Pin<Box<F>>>) -> F::Output {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn relay_changed(counter: &Option<Arc<tcp::Relayed>>) {
    match counter {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

async fn next_order(link: &mut Option<Link>) -> Option<Server> {
    match link {
        Some(l) => l.next_order().await,
        None => std::future::pending().await,
    }
}
