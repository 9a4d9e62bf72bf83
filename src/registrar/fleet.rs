//! `serve --catalog etcd=...`: this host's part in the fleet. One task
//! publishes this host's instances to etcd under a lease and follows the
//! whole catalog back, for the egress services (`state::fleet` turns both
//! into resources).
//!
//! - **Publish.** One key per instance (`catalog::key`), all on one lease
//!   of `--catalog-ttl` (10 s), renewed every third of it. Each change of
//!   the local instances puts what changed and deletes what went. A dead
//!   host's keys expire with its lease; a clean shutdown revokes it.
//! - **Follow.** Read the prefix, then watch it from the next revision;
//!   every batch of changes gives the registry a new catalog. Puts and
//!   deletes go in transactions of up to 128 writes.
//! - **Faults.** A failed call marks etcd down (`status`, `/healthz`,
//!   `/metrics`), ends the session and retries with backoff (0.5 s to
//!   5 s), starting on another member than the one that failed.
//!   Meanwhile the last catalog stays and local ports keep working. A
//!   watch cannot tell a cut-off member from a quiet catalog, so the task
//!   asks it for progress every second and gives up on it after 4 s of
//!   silence; the lease renewals, on the same member, time out as well.
//!   Back up, the registrar keeps its lease (or takes a new one if it
//!   expired), puts every instance again, and resumes the watch after the
//!   last revision it saw, so that the changes made meanwhile arrive in
//!   order; only if etcd has compacted that history is the catalog read
//!   afresh.
//! - **Restart.** A new registrar puts its instances (on its own lease)
//!   as soon as Docker has named its mappings, within the old lease's TTL,
//!   so no instance leaves the catalog. Keys of the old run that are no
//!   longer true expire with the old lease.

use super::docker::api::Network;
use super::docker::client::{Docker, DockerError};
use super::keeper::{Input, Registrar};
use super::state::fleet::{EtcdReport, EtcdState, Instances};
use crate::catalog::{self, Instance};
use crate::etcd::{Error as EtcdError, Etcd, Event, Lease, Watch, Write};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `serve`'s fleet flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://IP:PORT[,...]`, checked by `etcd::endpoints`.
    pub etcd: String,
    pub advertise: IpAddr,
    pub host_id: String,
    pub egress: EgressAt,
    pub ttl: Duration,
}

/// Where egress listeners listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressAt {
    /// The gateway of Docker's default bridge, which containers reach.
    DockerBridge,
    At(IpAddr),
    Off,
}

pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often the watch is asked where it stands, and how long it may
/// stay silent after that before it is taken for dead.
const HEARTBEAT: Duration = Duration::from_secs(1);
const SILENT: Duration = Duration::from_secs(4);

/// What the task holds while etcd answers.
struct Session {
    lease: Lease,
    watch: Watch,
}

/// Publishes `local` (this host's instances, as the registry has them)
/// and follows the catalog until `stop` is set; then revokes the lease.
pub async fn run(
    cfg: Config,
    etcd: Etcd,
    registry: Registrar,
    mut local: watch::Receiver<super::state::fleet::Instances>,
    docker: Option<Arc<Docker>>,
    mut stop: watch::Receiver<bool>,
) {
    // Ends with this task: the egress address is found once, or never.
    let egress = resolve_egress(cfg.egress, registry.clone(), docker);
    tokio::pin!(egress);
    let mut egress_done = false;
    let ttl = cfg.ttl.max(Duration::from_secs(2));
    // The lease this run holds, and the last revision the catalog has
    // every change of: both outlive a session, so that a reconnect keeps
    // the lease and resumes the watch.
    let mut lease: Option<i64> = None;
    let mut revision: Option<i64> = None;
    // What this run has put, by key: the value's bytes.
    let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut catalog: BTreeMap<String, Instance> = BTreeMap::new();
    let mut session: Option<Session> = None;
    let mut backoff = MIN_BACKOFF;
    let mut renew = tokio::time::interval(ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *stop.borrow() {
            break;
        }
        let Some(s) = session.as_mut() else {
            let attempt = connect(
                &etcd,
                ttl,
                (lease, revision),
                &mut local,
                &mut published,
                &mut catalog,
            );
            match attempt.await {
                Ok(s) => {
                    lease = Some(s.lease.id());
                    revision = Some(s.watch.revision());
                    report(&registry, Ok(&s.watch));
                    registry.tell(Input::Catalog(Arc::new(catalog.clone())));
                    tracing::info!(
                        "fleet: published {} instance(s) as {:?}; the catalog has {}",
                        published.len(),
                        cfg.host_id,
                        catalog.len()
                    );
                    backoff = MIN_BACKOFF;
                    session = Some(s);
                    renew.reset();
                    heartbeat.reset();
                }
                Err((e, kept)) => {
                    lease = kept;
                    report(&registry, Err(&e));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                        _ = &mut egress, if !egress_done => egress_done = true,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        };
        // A failure, and the member it came from.
        let failed: Option<(EtcdError, Option<&str>)> = tokio::select! {
            _ = stop.changed() => None,
            _ = &mut egress, if !egress_done => {
                egress_done = true;
                None
            }
            r = local.changed() => match r {
                Ok(()) => sync(&etcd, s.lease.id(), &mut local, &mut published)
                    .await
                    .err()
                    .map(|e| (e, None)),
                Err(_) => break,
            },
            _ = renew.tick() => match s.lease.renew().await {
                Ok(0) => {
                    // Expired (etcd was away too long): everything again.
                    tracing::warn!("fleet: lease {:x} expired; publishing again", s.lease.id());
                    lease = None;
                    published.clear();
                    let detail = "lease expired".into();
                    Some((EtcdError::Refused { call: "lease keep-alive", detail }, None))
                }
                Ok(_) => None,
                Err(e) => Some((e, Some(s.lease.member()))),
            },
            // A watch on a member that went away says nothing: ask it
            // where it stands, and give up on it if it stays silent.
            _ = heartbeat.tick() => match s.watch.quiet_for() {
                quiet if quiet > SILENT => {
                    let why = format!("{} said nothing on the watch for {}s", s.watch.member(), quiet.as_secs());
                    Some((EtcdError::WatchEnded(why), Some(s.watch.member())))
                }
                _ => s.watch.request_progress().await.err().map(|e| (e, Some(s.watch.member()))),
            },
            r = s.watch.next() => match r {
                Ok((rev, events)) => {
                    revision = Some(rev);
                    if !events.is_empty() {
                        apply(&mut catalog, events);
                        registry.tell(Input::Catalog(Arc::new(catalog.clone())));
                    }
                    None
                }
                Err(e) => Some((e, Some(s.watch.member()))),
            },
        };
        if let Some((e, member)) = failed {
            // What failed there may still look alive: start elsewhere.
            if let Some(m) = member {
                etcd.shun(m);
            }
            tracing::warn!("fleet: {e}; connecting again");
            report(&registry, Err(&e));
            session = None;
        }
    }
    // A clean stop: this host's instances leave the fleet now, not at the
    // end of the TTL.
    if let Some(l) = lease {
        match etcd.revoke(l).await {
            Ok(()) => tracing::info!("fleet: revoked lease {l:x}; this host's instances are gone"),
            Err(e) => tracing::warn!("fleet: could not revoke lease {l:x} ({e}); it expires"),
        }
    }
}

/// Renews the lease `kept.0` (or takes a new one if it expired),
/// publishes every local instance, and watches the catalog: from the
/// revision after `kept.1` if there is one and etcd still has its
/// history, else from a fresh read. On failure, the lease that may still
/// be alive is given back.
async fn connect(
    etcd: &Etcd,
    ttl: Duration,
    kept: (Option<i64>, Option<i64>),
    local: &mut watch::Receiver<Instances>,
    published: &mut BTreeMap<String, Vec<u8>>,
    catalog: &mut BTreeMap<String, Instance>,
) -> Result<Session, (EtcdError, Option<i64>)> {
    let (lease, revision) = kept;
    let renewed = match lease {
        Some(l) => etcd.keep_alive(l).await.map_err(|e| (e, Some(l)))?,
        None => None,
    };
    let lease = match renewed {
        Some(l) => l,
        None => {
            let id = etcd.grant(ttl.as_secs()).await.map_err(|e| (e, None))?;
            etcd.keep_alive(id)
                .await
                .map_err(|e| (e, Some(id)))?
                .ok_or_else(|| {
                    let detail = "a new lease was gone at once".to_string();
                    (
                        EtcdError::Refused {
                            call: "lease keep-alive",
                            detail,
                        },
                        None,
                    )
                })?
        }
    };
    let id = lease.id();
    // Everything again: puts are idempotent, and etcd may have lost or
    // never seen some of them.
    published.clear();
    sync(etcd, id, local, published)
        .await
        .map_err(|e| (e, Some(id)))?;
    let resumed = match revision {
        Some(r) => match etcd.watch_prefix(catalog::PREFIX, r + 1).await {
            Ok(w) => Some(w),
            Err(EtcdError::Compacted(c)) => {
                tracing::info!(
                    "fleet: etcd compacted past revision {c}; reading the catalog afresh"
                );
                None
            }
            Err(e) => return Err((e, Some(id))),
        },
        None => None,
    };
    let watch = match resumed {
        Some(w) => w,
        None => {
            let (revision, kvs) = etcd
                .get_prefix(catalog::PREFIX)
                .await
                .map_err(|e| (e, Some(id)))?;
            let watch = etcd
                .watch_prefix(catalog::PREFIX, revision + 1)
                .await
                .map_err(|e| (e, Some(id)))?;
            catalog.clear();
            apply(catalog, kvs.into_iter().map(Event::Put).collect());
            watch
        }
    };
    Ok(Session { lease, watch })
}

/// Puts the local instances that changed since they were published and
/// deletes those that are gone, in as few transactions as etcd takes.
async fn sync(
    etcd: &Etcd,
    lease: i64,
    local: &mut watch::Receiver<Instances>,
    published: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), EtcdError> {
    let want: BTreeMap<String, Vec<u8>> = local
        .borrow_and_update()
        .iter()
        .map(|(k, i)| (k.clone(), catalog::encode(i)))
        .collect();
    let writes = changes(published, &want);
    if writes.is_empty() {
        return Ok(());
    }
    etcd.write(&writes, lease).await?;
    *published = want;
    Ok(())
}

/// The writes that take etcd from `published` to `want`.
fn changes(published: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) -> Vec<Write> {
    let gone = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|k| Write::Delete(k.clone()));
    let put = want
        .iter()
        .filter(|(k, v)| published.get(*k) != Some(*v))
        .map(|(k, v)| Write::Put(k.clone(), v.clone()));
    gone.chain(put).collect()
}

/// Applies changes to the catalog; keys and values that are not ours to
/// read are skipped, with a warning.
fn apply(catalog: &mut BTreeMap<String, Instance>, events: Vec<Event>) {
    for ev in events {
        match ev {
            Event::Delete(key) => {
                catalog.remove(&key);
            }
            Event::Put(kv) => {
                let read = catalog::parse_key(&kv.key)
                    .map(|(service, host, _)| (service.to_string(), host.to_string()))
                    .and_then(|names| Ok((names, catalog::decode(&kv.value)?)));
                match read {
                    Ok(((service, host), i)) if host == i.host_id && service == i.service => {
                        catalog.insert(kv.key, i);
                    }
                    Ok(_) => {
                        tracing::warn!(
                            "fleet: {} names another service or host than its key; skipped",
                            kv.key
                        );
                        catalog.remove(&kv.key);
                    }
                    Err(e) => {
                        tracing::warn!("fleet: {}: {e}; skipped", kv.key);
                        catalog.remove(&kv.key);
                    }
                }
            }
        }
    }
}

/// Tells the registry that etcd answers (the catalog's watch is
/// `watching`) or what failed.
fn report(registry: &Registrar, how: Result<&Watch, &EtcdError>) {
    registry.tell(Input::Etcd(match how {
        Ok(w) => EtcdReport::Answers {
            member: w.member().to_string(),
        },
        Err(e) => EtcdReport::Fails(e.to_string()),
    }));
}

/// Sets where egress listens: the flag's address, or Docker's bridge
/// gateway once Docker says what it is.
async fn resolve_egress(at: EgressAt, registry: Registrar, docker: Option<Arc<Docker>>) {
    let ip = match at {
        EgressAt::Off => {
            tracing::info!("fleet: no egress (--egress none)");
            return;
        }
        EgressAt::At(ip) => ip,
        EgressAt::DockerBridge => {
            let Some(docker) = docker else {
                tracing::warn!(
                    "fleet: no egress: without Docker (--docker none), give --egress IP"
                );
                return;
            };
            let mut pause = MIN_BACKOFF;
            loop {
                match bridge_gateway(&docker).await {
                    Ok(ip) => break ip,
                    Err(e) => tracing::warn!("fleet: egress waits for Docker's bridge: {e}"),
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
    };
    tracing::info!("fleet: egress listens on {ip}");
    registry.tell(Input::EgressIp(Some(ip)));
}

/// The IPv4 gateway of Docker's default `bridge` network; when Docker
/// leaves it blank (a bridge given with `--bridge`), the bridge
/// interface's own address.
async fn bridge_gateway(docker: &Docker) -> Result<IpAddr, EgressError> {
    let get = docker.get::<Network>("/networks/bridge");
    let net = tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .map_err(|_| DockerError::Timeout("GET /networks/bridge".into()))??;
    let configured = net
        .ipam
        .config
        .iter()
        .filter_map(|c| c.gateway.split('/').next()?.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4);
    if let Some(ip) = configured {
        return Ok(ip);
    }
    let name = net
        .options
        .get("com.docker.network.bridge.name")
        .map_or("docker0", String::as_str);
    let addrs = nix::ifaddrs::getifaddrs().map_err(EgressError::Interfaces)?;
    for a in addrs.filter(|a| a.interface_name == name) {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Ok(IpAddr::V4(sin.ip()));
        }
    }
    Err(EgressError::NoAddress(name.to_string()))
}

/// Why the egress address is not known yet.
#[derive(Debug, thiserror::Error)]
enum EgressError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot list the network interfaces")]
    Interfaces(#[source] nix::Error),
    #[error("the bridge network has no gateway, and {0} no IPv4 address")]
    NoAddress(String),
}

/// For `/healthz` and `status`: one line on etcd.
pub fn describe(state: &EtcdState) -> String {
    match (&state.error, state.seen) {
        (None, true) => match &state.member {
            Some(m) => format!("connected, watching through {m}"),
            None => "connected".into(),
        },
        (None, false) => "connecting".into(),
        (Some(e), _) => format!("unreachable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ContainerInfo, Health};
    use crate::etcd::Kv;
    use crate::mapping::Mode;

    fn instance(host: &str) -> Instance {
        Instance {
            service: "web".into(),
            environment: None,
            host_id: host.into(),
            address: "10.0.0.2:8080".parse().unwrap(),
            mode: Mode::Http,
            container: ContainerInfo {
                name: "web".into(),
                id: "1".into(),
            },
            image: String::new(),
            health: Health::Healthy,
            service_port: Some(10080),
            mesh_port: None,
            check: None,
        }
    }

    fn put(key: &str, value: &[u8]) -> Event {
        Event::Put(Kv {
            key: key.into(),
            value: value.to_vec(),
            lease: 0,
        })
    }

    #[test]
    fn the_catalog_takes_good_records_and_skips_the_rest() {
        let good = catalog::key("web", "b", "tcp_0-0-0-0_8080").unwrap();
        let liar = catalog::key("web", "c", "tcp_0-0-0-0_8080").unwrap();
        let mut cat = BTreeMap::new();
        apply(
            &mut cat,
            vec![
                put(&good, &catalog::encode(&instance("b"))),
                // The value names another host, or service, than its key.
                put(&liar, &catalog::encode(&instance("b"))),
                put(
                    &catalog::key("api", "b", "tcp_0-0-0-0_8080").unwrap(),
                    &catalog::encode(&instance("b")),
                ),
                put("/envoy-docker/v1/instances/web/b", b"{}"),
                put(&catalog::key("x", "b", "l").unwrap(), b"\xff not json"),
            ],
        );
        assert_eq!(cat.keys().collect::<Vec<_>>(), [&good]);
        // A record that turns bad is dropped, not kept stale.
        apply(&mut cat, vec![put(&good, b"[]")]);
        assert!(cat.is_empty());
        apply(&mut cat, vec![put(&good, &catalog::encode(&instance("b")))]);
        apply(&mut cat, vec![Event::Delete(good.clone())]);
        assert!(cat.is_empty());
    }

    #[test]
    fn only_what_changed_is_written_and_deletes_come_first() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let published = map(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let want = map(&[("a", "1"), ("b", "2"), ("d", "1")]);
        assert_eq!(
            changes(&published, &want),
            [
                Write::Delete("c".into()),
                Write::Put("b".into(), b"2".to_vec()),
                Write::Put("d".into(), b"1".to_vec()),
            ]
        );
        assert!(changes(&want, &want).is_empty());
    }

    #[test]
    fn etcd_state_reads_as_one_line() {
        let mut s = EtcdState::default();
        assert_eq!(describe(&s), "connecting");
        s.seen = true;
        assert_eq!(describe(&s), "connected");
        s.error = Some("no etcd member answered".into());
        assert!(describe(&s).starts_with("unreachable: no etcd"));
    }
}
