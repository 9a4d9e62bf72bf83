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
//!   every batch of changes gives the registry a new catalog.
//! - **Faults.** A failed call marks etcd down (`status`, `/healthz`,
//!   `/metrics`), drops the watch and retries with backoff (0.5 s to 5 s).
//!   Meanwhile the last catalog stays and local ports keep working. A
//!   watch cannot tell a partition from a quiet catalog, so the renewals
//!   double as the heartbeat. Back up, the registrar renews its lease, or
//!   takes a new one if it expired, puts every instance again, and reads
//!   the catalog afresh.
//! - **Restart.** A new registrar puts its instances (on its own lease)
//!   as soon as Docker has named its mappings, within the old lease's TTL,
//!   so no instance leaves the catalog. Keys of the old run that are no
//!   longer true expire with the old lease.

use super::docker::client::Docker;
use super::keeper::{Input, Registrar};
use super::state::fleet::{EtcdState, Instances};
use crate::catalog::{self, Instance};
use crate::etcd::{Error as EtcdError, Etcd, Event, Watch};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `serve`'s fleet flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://IP:PORT[,...]`, checked by `Etcd::new`.
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

/// What the task holds while etcd answers.
struct Session {
    lease: i64,
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
    let mut lease: Option<i64> = None;
    // What this run has put, by key: the value's bytes.
    let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut catalog: BTreeMap<String, Instance> = BTreeMap::new();
    let mut session: Option<Session> = None;
    let mut backoff = MIN_BACKOFF;
    let mut renew = tokio::time::interval(ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *stop.borrow() {
            break;
        }
        let Some(s) = session.as_mut() else {
            let attempt = connect(&etcd, ttl, lease, &mut local, &mut published, &mut catalog);
            match attempt.await {
                Ok(s) => {
                    lease = Some(s.lease);
                    report(&registry, None);
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
                }
                Err((e, kept)) => {
                    lease = kept;
                    report(&registry, Some(&e));
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
        let failed: Option<EtcdError> = tokio::select! {
            _ = stop.changed() => None,
            _ = &mut egress, if !egress_done => {
                egress_done = true;
                None
            }
            r = local.changed() => match r {
                Ok(()) => sync(&etcd, s.lease, &mut local, &mut published).await.err(),
                Err(_) => break,
            },
            _ = renew.tick() => match etcd.keep_alive(s.lease).await {
                Ok(0) => {
                    // Expired (etcd was away too long): everything again.
                    tracing::warn!("fleet: lease {:x} expired; publishing again", s.lease);
                    lease = None;
                    published.clear();
                    Some(EtcdError::Refused { call: "lease keep-alive", detail: "lease expired".into() })
                }
                Ok(_) => None,
                Err(e) => Some(e),
            },
            r = s.watch.next() => match r {
                Ok((_, events)) => {
                    apply(&mut catalog, events);
                    registry.tell(Input::Catalog(Arc::new(catalog.clone())));
                    None
                }
                Err(e) => Some(e),
            },
        };
        if let Some(e) = failed {
            report(&registry, Some(&e));
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

/// Takes or renews the lease, publishes every local instance, reads the
/// catalog and starts watching it. On failure, the lease that may still be
/// alive is given back.
async fn connect(
    etcd: &Etcd,
    ttl: Duration,
    lease: Option<i64>,
    local: &mut watch::Receiver<Instances>,
    published: &mut BTreeMap<String, Vec<u8>>,
    catalog: &mut BTreeMap<String, Instance>,
) -> Result<Session, (EtcdError, Option<i64>)> {
    let lease = match lease {
        Some(l) => match etcd.keep_alive(l).await {
            Ok(0) => None,
            Ok(_) => Some(l),
            Err(e) => return Err((e, Some(l))),
        },
        None => None,
    };
    let lease = match lease {
        Some(l) => l,
        None => {
            published.clear();
            etcd.grant(ttl.as_secs()).await.map_err(|e| (e, None))?
        }
    };
    // Everything again: puts are idempotent, and etcd may have lost or
    // never seen some of them.
    published.clear();
    sync(etcd, lease, local, published)
        .await
        .map_err(|e| (e, Some(lease)))?;
    let (revision, kvs) = etcd
        .get_prefix(catalog::PREFIX)
        .await
        .map_err(|e| (e, Some(lease)))?;
    catalog.clear();
    apply(catalog, kvs.into_iter().map(Event::Put).collect());
    let watch = etcd
        .watch_prefix(catalog::PREFIX, revision + 1)
        .await
        .map_err(|e| (e, Some(lease)))?;
    Ok(Session { lease, watch })
}

/// Puts the local instances that changed since they were published and
/// deletes those that are gone.
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
    let gone: Vec<String> = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        etcd.delete(&key).await?;
        published.remove(&key);
    }
    for (key, value) in want {
        if published.get(&key) != Some(&value) {
            etcd.put(&key, &value, lease).await?;
            published.insert(key, value);
        }
    }
    Ok(())
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

fn report(registry: &Registrar, error: Option<&EtcdError>) {
    registry.tell(Input::Etcd(error.map(|e| e.to_string())));
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
async fn bridge_gateway(docker: &Docker) -> Result<IpAddr, String> {
    let net = tokio::time::timeout(Duration::from_secs(3), docker.get_json("/networks/bridge"))
        .await
        .map_err(|_| "GET /networks/bridge timed out".to_string())??;
    let configured = net["IPAM"]["Config"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["Gateway"].as_str())
        .filter_map(|g| g.split('/').next()?.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4);
    if let Some(ip) = configured {
        return Ok(ip);
    }
    let name = net["Options"]["com.docker.network.bridge.name"]
        .as_str()
        .unwrap_or("docker0");
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| e.to_string())?;
    for a in addrs.filter(|a| a.interface_name == name) {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Ok(IpAddr::V4(sin.ip()));
        }
    }
    Err(format!(
        "the bridge network has no gateway, and {name} no IPv4 address"
    ))
}

/// For `/healthz` and `status`: one line on etcd.
pub fn describe(state: &EtcdState) -> String {
    match (&state.error, state.seen) {
        (None, true) => "connected".into(),
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
    fn etcd_state_reads_as_one_line() {
        let mut s = EtcdState::default();
        assert_eq!(describe(&s), "connecting");
        s.seen = true;
        assert_eq!(describe(&s), "connected");
        s.error = Some("no etcd member answered".into());
        assert!(describe(&s).starts_with("unreachable: no etcd"));
    }
}
