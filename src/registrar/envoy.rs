//! `serve --envoy PATH`: runs Envoy as a child of the registrar, with a
//! bootstrap generated for this registrar, restarts it when it dies, and
//! stops it when the registrar shuts down. This is what makes one command
//! run the whole host side.

use crate::addr::Addr;
use crate::xds::bootstrap::{AdsKind, Bootstrap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub struct Supervisor {
    pub envoy: PathBuf,
    pub bootstrap: Bootstrap,
    /// Where the generated bootstrap is written.
    pub config: PathBuf,
}

impl Supervisor {
    /// Runs until `stop` turns true; then stops Envoy and returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let yaml = crate::xds::bootstrap::render(&self.bootstrap);
        if let Err(e) = std::fs::write(&self.config, yaml) {
            tracing::error!(
                "cannot write {}: {e}; not starting Envoy",
                self.config.display()
            );
            return;
        }
        let mut pause = Duration::from_millis(500);
        loop {
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("cannot start {}: {e}", self.envoy.display());
                    if sleep_or_stop(&mut stop, pause).await {
                        return;
                    }
                    pause = (pause * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            tracing::info!("started Envoy (pid {:?})", child.id());
            let started = tokio::time::Instant::now();
            let status = tokio::select! {
                status = child.wait() => status,
                _ = stopped(&mut stop) => {
                    terminate(&mut child).await;
                    return;
                }
            };
            tracing::warn!("Envoy exited ({status:?}); restarting");
            if started.elapsed() > Duration::from_secs(30) {
                pause = Duration::from_millis(500);
            }
            if sleep_or_stop(&mut stop, pause).await {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    fn spawn(&self) -> std::io::Result<Child> {
        Command::new(&self.envoy)
            .arg("-c")
            .arg(&self.config)
            .arg("--disable-hot-restart")
            // Access-log lines within a second, not Envoy's default ten.
            .args(["--file-flush-interval-msec", "1000"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    }
}

/// Sleeps, unless told to stop first (then returns true).
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopped(stop) => true,
    }
}

/// SIGTERM, then SIGKILL after five seconds.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    tracing::info!("stopped Envoy");
}

/// The bootstrap a supervised Envoy gets: this registrar's xDS address.
pub fn bootstrap_for(xds: &Addr, node_id: &str, admin: Addr) -> Bootstrap {
    Bootstrap {
        xds: match xds {
            // Envoy cannot connect to a wildcard address.
            Addr::Tcp(sa) if sa.ip().is_unspecified() => {
                let ip: std::net::IpAddr = if sa.is_ipv6() {
                    std::net::Ipv6Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv4Addr::LOCALHOST.into()
                };
                Addr::Tcp(std::net::SocketAddr::new(ip, sa.port()))
            }
            other => other.clone(),
        },
        admin,
        node_id: node_id.into(),
        ads: AdsKind::Delta,
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
