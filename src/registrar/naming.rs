//! Names the container behind a registration (its labels set the
//! mapping's name and mode), without letting Docker's API hold up the
//! proxy that registers.
//!
//! dockerd starts a container's proxies one after another, and waits for
//! each. So a lookup that waits on a slow Docker costs that wait once per
//! published port: on a dockerd restart, whose API does not answer until
//! every `--restart always` container is up again, that was over a second
//! per port. Here:
//! - a lookup waits at most [`BUDGET`]; once one has run out, Docker counts
//!   as slow, and registrations go on at once with no name (the watcher
//!   names them when Docker answers again; see `docker::follow`);
//! - while Docker is slow, one lookup at a time probes it in the
//!   background, with the longer [`PROBE_BUDGET`]; the first that answers
//!   ends the slow spell and names its container;
//! - a container named in the last [`RECENT`] is not looked up again, so a
//!   port range's thousand proxies cost Docker one lookup, not a thousand.

use super::docker::{self, client::Docker, meta::ContainerMeta};
use super::keeper::{Input, Registrar};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a registration waits for Docker: below the proxy's own
/// one-second start-up budget, and long enough for a busy dockerd's
/// usual answer. Only the first lookup of a slow spell waits this long.
pub const BUDGET: Duration = Duration::from_millis(800);
/// How long a background probe of a slow Docker waits.
pub const PROBE_BUDGET: Duration = Duration::from_millis(1500);
/// How long a lookup's answer is reused for the same container address.
pub const RECENT: Duration = Duration::from_secs(2);

/// The one container named last, and when.
type Recent = Option<(IpAddr, Instant, ContainerMeta)>;

pub struct Namer {
    docker: Arc<Docker>,
    /// Set when a lookup ran out of time, cleared when one answers.
    slow: AtomicBool,
    /// Set while a background probe runs.
    probing: AtomicBool,
    recent: Mutex<Recent>,
}

impl Namer {
    pub fn new(docker: Arc<Docker>) -> Arc<Namer> {
        Arc::new(Namer {
            docker,
            slow: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            recent: Mutex::new(None),
        })
    }

    /// Whether Docker counts as slow now.
    pub fn slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// The container at `ip`, if Docker names it in time; `None` on any
    /// trouble, and at once while Docker is slow.
    pub async fn name(
        self: &Arc<Self>,
        ip: IpAddr,
        registrar: &Registrar,
    ) -> Option<ContainerMeta> {
        if let Some(meta) = self.recall(ip, Instant::now()) {
            return Some(meta);
        }
        if self.slow() {
            self.probe(ip, registrar);
            return None;
        }
        match tokio::time::timeout(BUDGET, docker::lookup(&self.docker, ip)).await {
            Ok(Ok(meta)) => {
                self.remember(ip, meta.as_ref());
                meta
            }
            Ok(Err(e)) => {
                tracing::debug!("no container found for {ip}: {e}");
                None
            }
            Err(_) => {
                if !self.slow.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "Docker took over {BUDGET:?} to name the container at {ip}; \
                         registrations go on unnamed until it answers"
                    );
                }
                None
            }
        }
    }

    fn recall(&self, ip: IpAddr, now: Instant) -> Option<ContainerMeta> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        fresh(&recent, ip, now).cloned()
    }

    fn remember(&self, ip: IpAddr, meta: Option<&ContainerMeta>) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        *recent = meta.map(|m| (ip, Instant::now(), m.clone()));
    }

    /// Starts a background lookup unless one runs already.
    fn probe(self: &Arc<Self>, ip: IpAddr, registrar: &Registrar) {
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        let registrar = registrar.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(PROBE_BUDGET, docker::lookup(&me.docker, ip)).await;
            if let Ok(Ok(meta)) = answer {
                tracing::info!("Docker answers again; registrations are named again");
                me.slow.store(false, Ordering::Relaxed);
                me.remember(ip, meta.as_ref());
                if let Some(meta) = meta {
                    registrar.tell(Input::Container(meta));
                }
            }
            me.probing.store(false, Ordering::Relaxed);
        });
    }
}

/// The remembered container, if it is at `ip` and young enough.
fn fresh(recent: &Recent, ip: IpAddr, now: Instant) -> Option<&ContainerMeta> {
    match recent {
        Some((at, when, meta)) if *at == ip && now.saturating_duration_since(*when) <= RECENT => {
            Some(meta)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_answer_is_reused_for_the_same_address_only_and_not_for_long() {
        let ip: IpAddr = "172.17.0.2".parse().unwrap();
        let other: IpAddr = "172.17.0.3".parse().unwrap();
        let t0 = Instant::now();
        let meta = ContainerMeta {
            id: "abc".into(),
            ..Default::default()
        };
        let recent: Recent = Some((ip, t0, meta.clone()));
        assert_eq!(fresh(&recent, ip, t0 + Duration::from_secs(1)), Some(&meta));
        assert_eq!(fresh(&recent, other, t0), None);
        assert_eq!(
            fresh(&recent, ip, t0 + RECENT + Duration::from_millis(1)),
            None
        );
        assert_eq!(fresh(&None, ip, t0), None);
    }
}
