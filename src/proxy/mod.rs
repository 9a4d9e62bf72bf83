//! The proxy role: what dockerd runs once per published port and address
//! family, in place of docker-proxy.
//!
//! Start-up order matters and is kept small, because `docker run` waits for
//! it:
//! 1. take fd 3 (the readiness pipe) and, with `-use-listen-fd`, fd 4,
//!    before anything else can open a descriptor;
//! 2. parse docker-proxy's flags; bad flags are reported on fd 3;
//! 3. TCP: close fd 4 so Envoy can bind the port; UDP: bind (or adopt fd 4)
//!    and relay in-process;
//! 4. register with the registrar and wait for Envoy's verdict (TCP), then
//!    write `0\n` or `1\n<error>`;
//! 5. live as long as the mapping: keep the registrar connection, register
//!    again if the registrar restarts, and deregister on SIGINT or SIGTERM.
//!
//! The data path for TCP is Envoy's. A later relay for ports no Envoy
//! serves would slot in at step 4, next to the UDP relay.
//!
//! The proxy runs once per published port, so it stays small: one thread,
//! and no log subscriber (its few messages go straight to stderr).

pub mod flags;
pub mod link;
pub mod status;
pub mod udp;

use crate::mapping::Proto;
use flags::{Command, ProxyFlags};
use link::{Link, Verdict};
use status::StatusPipe;
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use tokio::signal::unix::{signal, SignalKind};

const LISTEN_FD: i32 = 4;

/// Runs the proxy role with the arguments after argv[0]; returns the exit
/// status.
pub fn run(args: &[OsString]) -> i32 {
    let mut status = StatusPipe::take();
    let flags = match flags::parse(args) {
        Ok(Command::Run(f)) => f,
        Ok(Command::Version) => {
            println!("{}", crate::version::line());
            return 0;
        }
        Ok(Command::Help) => {
            println!("{}", flags::USAGE);
            return 0;
        }
        Err(e) => {
            status.fail(&e);
            return 1;
        }
    };
    let listen_fd = if flags.use_listen_fd {
        match take_listen_fd() {
            Some(fd) => Some(fd),
            None => {
                status.fail("-use-listen-fd was given but fd 4 is not open");
                return 1;
            }
        }
    } else {
        None
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            status.fail(&format!("cannot start: {e}"));
            return 1;
        }
    };
    rt.block_on(serve(flags, listen_fd, status))
}

fn take_listen_fd() -> Option<OwnedFd> {
    // SAFETY: only asks whether fd 4 exists.
    let open = unsafe { nix::libc::fcntl(LISTEN_FD, nix::libc::F_GETFD) } != -1;
    // SAFETY: with -use-listen-fd, dockerd gives fd 4 to the proxy alone.
    open.then(|| unsafe { OwnedFd::from_raw_fd(LISTEN_FD) })
}

async fn serve(flags: ProxyFlags, listen_fd: Option<OwnedFd>, mut status: StatusPipe) -> i32 {
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

    let relay = match mapping.key.proto {
        Proto::Sctp => {
            status.fail("SCTP is not supported by envoy-docker; publish this port as tcp or udp");
            return 1;
        }
        Proto::Tcp => {
            // Envoy binds the port itself: let go of dockerd's socket first.
            drop(listen_fd);
            None
        }
        Proto::Udp => {
            let sock = match listen_fd {
                Some(fd) => udp::adopt(fd),
                None => udp::bind_host(mapping.key.host_addr()),
            };
            match sock.and_then(|s| udp::Relay::new(s, mapping.backend.addr())) {
                Ok(r) => Some(r),
                Err(e) => {
                    status.fail(&format!(
                        "listen udp {}: bind: {e}",
                        mapping.key.host_addr()
                    ));
                    return 1;
                }
            }
        }
    };

    let path = crate::addr::socket_path(None);
    let registered = tokio::select! {
        r = Link::register(&path, mapping, link::CONNECT_BUDGET, true) => r,
        _ = sigint.recv() => return 0,
        _ = sigterm.recv() => return 0,
    };
    let mut link = match registered {
        Ok((link, Verdict::Served)) => link,
        Ok((_, Verdict::Rejected(e))) => {
            status.fail(&e);
            return 1;
        }
        Err(e) => {
            status.fail(&e);
            return 1;
        }
    };
    if let Some(relay) = relay {
        tokio::spawn(relay.run());
    }
    status.ready();

    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = link.closed() => {
                eprintln!("envoy-docker proxy: lost the registrar at {}; registering again", path.display());
                link = tokio::select! {
                    l = link::reconnect(path.clone(), mapping) => l,
                    _ = sigint.recv() => return 0,
                    _ = sigterm.recv() => return 0,
                };
            }
        }
    }
    link.deregister().await;
    0
}
