//! The fleet's scenarios on three Docker hosts (`hosts`): each scenario is
//! a test of its own, so one failure does not hide the rest, and all of
//! them share one set of hosts, because setting the hosts up is the costly
//! part.
//!
//! The shared hosts are held by one test at a time ([`hold`]). Each test
//! finds the baseline in place (every host's etcd member, registrar and
//! Envoy running, no partition, and `web` on A and B, `hidden` on B and
//! `hc` on A, with C's egress spreading `web` over A and B), and puts back
//! whatever it changed. A test that fails may leave the hosts in any
//! state, so its failure tears them down, and the next test starts on
//! fresh ones.

use super::hosts::{self, Fleet};
use crate::harness::wait_until;
use envoy_docker::catalog::{self, Health, Instance};
use envoy_docker::etcd::{Etcd, Event};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const WEB: &str = "ServicePort_80=10080";
const WAIT: Duration = Duration::from_secs(30);
const A: &str = "host-a";
const B: &str = "host-b";
const C: &str = "host-c";
const WEB_A: &str = "web@host-a";
const WEB_B: &str = "web@host-b";
const HC_A: &str = "hc@host-a";
/// C's egress ports for `web`, `hc` and `late`.
const WEB_EGRESS: u16 = 10080;
const HC_EGRESS: u16 = 10081;
const LATE_EGRESS: u16 = 10082;

static SHARED: Mutex<Option<Fleet>> = Mutex::new(None);

/// One test's hold on the shared hosts.
struct Held(MutexGuard<'static, Option<Fleet>>);

impl std::ops::Deref for Held {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        self.0.as_ref().expect("held with hosts")
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Fleet {
        self.0.as_mut().expect("held with hosts")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if std::env::var_os("ED_DEBUG").is_some() {
                eprintln!("ED_DEBUG: the failed fleet stays up for 300 s");
                std::thread::sleep(Duration::from_secs(300));
            }
            // Torn down now; the next test sets up afresh.
            self.0.take();
        }
    }
}

extern "C" fn teardown_at_exit() {
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    shared.take();
}

/// The hosts to oneself: the shared ones are torn down, and the next test
/// that holds them sets them up afresh.
pub(super) fn exclusive() -> MutexGuard<'static, Option<Fleet>> {
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    shared.take();
    shared
}

/// The shared hosts with the baseline in place, set up on first use.
fn hold() -> Held {
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if shared.is_none() {
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain extern "C" function; it runs once at exit.
        AT_EXIT.call_once(|| unsafe {
            nix::libc::atexit(teardown_at_exit);
        });
        let mut fleet = Fleet::start();
        start_baseline(&mut fleet);
        *shared = Some(fleet);
    }
    let mut held = Held(shared);
    let egress = held.host("c").egress(WEB_EGRESS);
    let ok = wait_until(WAIT, || {
        only(&spread(held.host("c"), egress, 20), &[WEB_A, WEB_B])
    });
    assert!(
        ok,
        "the baseline is not in place: C's egress does not spread over A and B: {:?}\n{}\n{}\n{}",
        spread(held.host("c"), egress, 5),
        held.host("c").envoy_get("/clusters"),
        held.host("c").envoy_get("/listeners"),
        held.logs()
    );
    held
}

/// `web` on A (Sidecar's check labels: the first host, whose check the
/// egress clusters use) and on B (ours), `hidden` on B (kept out of the
/// catalog, as in Sidecar), and `hc` on A (Docker's own HEALTHCHECK, and
/// HTTP mode for the trace).
fn start_baseline(fleet: &mut Fleet) {
    let sidecar = [
        WEB,
        "HealthCheck=HttpGet",
        "HealthCheckArgs=http://{{ host }}:{{ tcp 80 }}/health",
        "HealthCheckInterval=1s",
    ];
    backend(fleet.host("a"), "web-a", "web", 8080, &sidecar, &[]);
    let ours = [WEB, "HealthCheck=http:/health", "HealthCheckInterval=1s"];
    backend(fleet.host("b"), "web-b", "web", 8080, &ours, &[]);
    let hidden = ["ServicePort_80=10090", "SidecarDiscover=false"];
    backend(fleet.host("b"), "hidden", "hidden", 8090, &hidden, &[]);
    backend(
        fleet.host("a"),
        "hc",
        "hc",
        8081,
        &["ServicePort_80=10081", "ProxyMode=http"],
        &[
            "--health-cmd",
            r#"[ "$(cat /tmp/h 2>/dev/null)" != sick ]"#,
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
}

/// The catalog as etcd holds it now, read through members `urls`. Around
/// a partition or a member's loss etcd may have no leader for a moment (a
/// busy machine makes its election slow): the read is retried, bounded,
/// until etcd answers.
fn catalog_now(urls: &str) -> Vec<Instance> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let read = || -> Result<Vec<Instance>, String> {
        let etcd = rt
            .block_on(Etcd::connect(urls))
            .map_err(|e| e.to_string())?;
        let (_, kvs) = rt
            .block_on(etcd.get_prefix(catalog::PREFIX))
            .map_err(|e| e.to_string())?;
        Ok(kvs
            .iter()
            .map(|kv| catalog::decode(&kv.value).unwrap())
            .collect())
    };
    let mut last = Err(String::new());
    wait_until(Duration::from_secs(15), || {
        last = read();
        last.is_ok()
    });
    last.unwrap_or_else(|e| panic!("etcd at {urls} does not answer: {e}"))
}

fn all_members() -> String {
    Fleet::etcd_urls(1)
}

fn has(catalog: &[Instance], service: &str, host: &str) -> bool {
    catalog
        .iter()
        .any(|i| i.service == service && i.host_id == host)
}

/// `n` GETs from inside host `from` to `addr`: how many each backend
/// answered (by its `Server` header), failures under "failed".
fn spread(from: &hosts::Host, addr: std::net::SocketAddr, n: usize) -> BTreeMap<String, usize> {
    hosts::in_ns(&from.ns, || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let who = match hosts::get(addr, "/") {
                Ok((200, server)) => server,
                Ok((code, _)) => format!("failed: HTTP {code}"),
                Err(e) => format!("failed: {}", e.kind()),
            };
            *seen.entry(who).or_insert(0) += 1;
        }
        seen
    })
}

fn only(seen: &BTreeMap<String, usize>, servers: &[&str]) -> bool {
    seen.keys().all(|k| servers.contains(&k.as_str()))
        && servers.iter().all(|s| seen.contains_key(*s))
}

/// Waits until `n` GETs from C to `port` of its egress are all answered,
/// by every one of `servers` and nobody else.
fn served_by(fleet: &mut Fleet, port: u16, n: usize, servers: &[&str]) -> bool {
    let egress = fleet.host("c").egress(port);
    wait_until(WAIT, || only(&spread(fleet.host("c"), egress, n), servers))
}

/// A web backend on `h`: `--server <service>@host-<name>`, /health as
/// the file /tmp/health says, published on `host_port`.
pub(super) fn backend(
    h: &hosts::Host,
    name: &str,
    service: &str,
    host_port: u16,
    labels: &[&str],
    docker_flags: &[&str],
) -> String {
    let publish = format!("{host_port}:80");
    let server = format!("{service}@{}", h.host_id());
    let mut args: Vec<String> = vec![
        "--name".into(),
        name.into(),
        "-l".into(),
        format!("ServiceName={service}"),
        "-p".into(),
        publish,
    ];
    for l in labels {
        args.push("-l".into());
        args.push(l.to_string());
    }
    args.extend(docker_flags.iter().map(|f| f.to_string()));
    args.extend(hosts::backend_args());
    args.push(hosts::image().into());
    for a in [
        "/usr/bin/python3",
        "/peers/peers.py",
        "http",
        "--port",
        "80",
        "--server",
        &server,
        "--health",
        "/tmp/health",
    ] {
        args.push(a.into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    h.run(&refs)
}

fn exec(h: &hosts::Host, container: &str, script: &str) {
    let out = h.docker(&["exec", container, "sh", "-c", script]);
    assert!(
        out.status.success(),
        "docker exec {container} {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn remove(h: &hosts::Host, container: &str) {
    let out = h.docker(&["rm", "-f", container]);
    assert!(
        out.status.success(),
        "docker rm -f {container}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Collects every watch event under the prefix from the moment `ready`
/// is told (the watch is in place) until `stop`.
fn watch_events(
    urls: &str,
    ready: std::sync::mpsc::Sender<()>,
    stop: std::sync::mpsc::Receiver<()>,
) -> Vec<Event> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::connect(urls)).unwrap();
    rt.block_on(async move {
        let (rev, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
        let mut watch = etcd.watch_prefix(catalog::PREFIX, rev + 1).await.unwrap();
        let _ = ready.send(());
        let mut seen = Vec::new();
        loop {
            if stop.try_recv().is_ok() {
                return seen;
            }
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
                seen.extend(r.unwrap().1);
            }
        }
    })
}

/// Both instances answer through host C's egress, and the catalog, `status
/// --fleet` and `/metrics` say what the hosts publish.
#[test]
fn fleet_egress_spreads_over_the_hosts_that_publish() {
    let mut fleet = hold();
    let egress = fleet.host("c").egress(WEB_EGRESS);
    let seen = spread(fleet.host("c"), egress, 200);
    assert!(only(&seen, &[WEB_A, WEB_B]), "{seen:?}");
    let cat = catalog_now(&all_members());
    assert!(has(&cat, "web", A) && has(&cat, "web", B), "{cat:?}");
    let i = cat
        .iter()
        .find(|i| i.service == "web" && i.host_id == A)
        .unwrap();
    assert_eq!(i.address.to_string(), "10.77.0.1:8080");
    assert_eq!(i.service_port, Some(10080));
    assert_eq!(i.container.name, "web-a");
    let check = i.check.as_ref().expect("Sidecar's labels give a check");
    assert_eq!(
        (check.http_path.as_deref(), check.port),
        (Some("/health"), 8080)
    );
    assert!(!cat.iter().any(|i| i.service == "hidden"), "{cat:?}");
    let status = fleet.host("c").status(&["--fleet"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("etcd connected") && text.contains("10.77.0.2:8080"),
        "{text}"
    );
    let metrics = fleet.host("c").registrar_get("/metrics");
    assert!(
        metrics.contains(r#"envoy_docker_fleet_instances{service="web",health="healthy"} 2"#)
            && metrics.contains("envoy_docker_etcd_up 1"),
        "{metrics}"
    );
    // The dashboard's fleet view: web on A and B, and C's egress for it.
    let api: serde_json::Value =
        serde_json::from_str(&fleet.host("c").registrar_get("/api/v1/fleet")).unwrap();
    assert_eq!(api["enabled"], true, "{api}");
    assert_eq!(api["etcd_ok"], true, "{api}");
    let web = api["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "web")
        .unwrap_or_else(|| panic!("no web in {api}"));
    let mut hosts: Vec<&str> = web["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host_id"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert_eq!(hosts, [A, B], "{api}");
    assert!(
        api["egress"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["service"] == "web" && e["port"] == 10080 && e["endpoints"] == 2),
        "{api}"
    );
}

/// An instance whose /health fails gets no requests, and gets them again
/// once healthy.
#[test]
fn fleet_a_sick_instance_gets_no_requests_until_it_is_well() {
    let mut fleet = hold();
    exec(fleet.host("a"), "web-a", "echo sick > /tmp/health");
    let t = Instant::now();
    let ok = served_by(&mut fleet, WEB_EGRESS, 10, &[WEB_B]);
    eprintln!(
        "fleet: a sick instance stopped getting requests after {:?}",
        t.elapsed()
    );
    let egress = fleet.host("c").egress(WEB_EGRESS);
    let seen = spread(fleet.host("c"), egress, 50);
    assert!(ok && only(&seen, &[WEB_B]), "sick A still served: {seen:?}");
    exec(fleet.host("a"), "web-a", "echo ok > /tmp/health");
    assert!(
        served_by(&mut fleet, WEB_EGRESS, 20, &[WEB_A, WEB_B]),
        "A did not come back"
    );
}

/// Docker's own HEALTHCHECK (real dockerd): unhealthy leaves the egress
/// cluster and the catalog says so; healthy comes back.
#[test]
fn fleet_follows_dockers_own_healthcheck() {
    let mut fleet = hold();
    assert!(
        served_by(&mut fleet, HC_EGRESS, 5, &[HC_A]),
        "hc never served through C's egress:\n{}",
        fleet.logs()
    );
    exec(fleet.host("a"), "hc", "echo sick > /tmp/h");
    let t = Instant::now();
    let ok = wait_until(WAIT, || {
        catalog_now(&all_members())
            .iter()
            .any(|i| i.service == "hc" && i.health == Health::Unhealthy)
    });
    assert!(ok, "Docker's unhealthy never reached the catalog");
    eprintln!(
        "fleet: Docker's unhealthy reached the catalog in {:?}",
        t.elapsed()
    );
    let hc = fleet.host("c").egress(HC_EGRESS);
    let ok = wait_until(WAIT, || {
        spread(fleet.host("c"), hc, 5)
            .keys()
            .all(|k| k.starts_with("failed"))
    });
    assert!(ok, "an unhealthy instance still got requests");
    let clusters = fleet.host("c").envoy_get("/clusters");
    assert!(
        clusters
            .lines()
            .any(|l| l.contains("egress-hc") && l.contains("health_flags::/failed_eds_health")),
        "{clusters}"
    );
    exec(fleet.host("a"), "hc", "echo well > /tmp/h");
    assert!(
        served_by(&mut fleet, HC_EGRESS, 5, &[HC_A]),
        "hc did not come back when healthy"
    );
}

/// One request from C through egress to A is one trace, with spans from
/// both hosts' Envoys.
#[test]
fn fleet_one_trace_spans_both_hosts() {
    let mut fleet = hold();
    let hc = fleet.host("c").egress(HC_EGRESS);
    let ok = wait_until(WAIT, || {
        let _ = spread(fleet.host("c"), hc, 1);
        let spans = fleet.otlp.spans();
        spans.iter().any(|egress| {
            egress.service == "egress-hc"
                && spans
                    .iter()
                    .any(|s| s.service == "hc" && s.trace_id == egress.trace_id)
        })
    });
    assert!(ok, "no shared trace: {:#?}", fleet.otlp.spans());
}

/// A registrar restart on A: its instances never leave the catalog (for
/// longer than the lease's TTL), and the new registrar publishes them.
#[test]
fn fleet_a_registrar_restart_keeps_its_instances_in_the_catalog() {
    let mut fleet = hold();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let urls = all_members();
    let watcher = std::thread::spawn(move || watch_events(&urls, ready_tx, stop_rx));
    ready_rx
        .recv_timeout(WAIT)
        .expect("the watch never started");
    fleet.host("a").kill_registrar();
    fleet.host("a").start_registrar();
    // The property is about time: nothing is deleted over a whole TTL.
    std::thread::sleep(Duration::from_secs(hosts::TTL_SECS + 3));
    stop_tx.send(()).unwrap();
    let events = watcher.join().unwrap();
    let deleted: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Delete(k) if k.contains("/host-a/")))
        .collect();
    assert!(deleted.is_empty(), "A's instances left: {deleted:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Put(kv) if kv.key.contains("/host-a/"))),
        "the restarted registrar did not publish: {events:?}"
    );
    let cat = catalog_now(&all_members());
    assert!(has(&cat, "web", A) && has(&cat, "hc", A), "{cat:?}");
}

/// With one etcd member down, publishing and routing go on; a removed
/// container's key goes at once.
#[test]
fn fleet_goes_on_with_one_etcd_member_down() {
    let mut fleet = hold();
    fleet.host("b").kill_etcd();
    backend(fleet.host("c"), "web-c", "web", 8080, &[WEB], &[]);
    let survivors = "http://10.78.0.1:2379,http://10.78.0.3:2379";
    let ok = wait_until(WAIT, || has(&catalog_now(survivors), "web", C));
    assert!(
        ok,
        "C could not publish with one member down:\n{}",
        fleet.logs()
    );
    let ok = wait_until(WAIT, || {
        fleet
            .host("a")
            .envoy_get("/clusters")
            .contains("egress-web_tcp_172-30-1-1_10080::10.77.0.3:8080::health_flags::healthy")
    });
    assert!(ok, "A's egress never got C's instance");
    let hc = fleet.host("c").egress(HC_EGRESS);
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &[HC_A]), "{seen:?}");
    fleet.host("b").restart_etcd(&Fleet::etcd_cluster());
    let all = all_members();
    let ok = wait_until(WAIT, || {
        hosts::etcdctl(&all, &["endpoint", "health", "--cluster"])
            .status
            .success()
    });
    assert!(ok, "member B did not rejoin");

    remove(fleet.host("c"), "web-c");
    let t = Instant::now();
    let ok = wait_until(Duration::from_secs(5), || {
        !has(&catalog_now(&all), "web", C)
    });
    eprintln!(
        "fleet: a removed container's key went {:?} after docker rm",
        t.elapsed()
    );
    assert!(ok, "web-c's key stayed after its container stopped");
}

/// C is cut off from etcd: it keeps routing with the last catalog while A
/// publishes a new service, and converges (and publishes again) once it
/// rejoins.
#[test]
fn fleet_a_partitioned_host_keeps_routing_and_converges_after() {
    let mut fleet = hold();
    backend(fleet.host("c"), "web-c", "web", 8080, &[WEB], &[]);
    let all = all_members();
    let ok = wait_until(WAIT, || has(&catalog_now(&all), "web", C));
    assert!(ok, "C never published web-c:\n{}", fleet.logs());
    let errors_before = etcd_errors(fleet.host("c"));

    fleet.host("c").cut_etcd(&[1, 2], true);
    fleet.host("a").cut_etcd(&[3], true);
    fleet.host("b").cut_etcd(&[3], true);
    let t = Instant::now();
    let ok = wait_until(WAIT, || {
        fleet
            .host("c")
            .registrar_get("/healthz")
            .contains("unreachable")
    });
    assert!(
        ok,
        "C never noticed: {}",
        fleet.host("c").registrar_get("/healthz")
    );
    eprintln!("fleet: C saw etcd unreachable in {:?}", t.elapsed());
    let hc = fleet.host("c").egress(HC_EGRESS);
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &[HC_A]), "C stopped routing: {seen:?}");
    backend(
        fleet.host("a"),
        "late",
        "late",
        8082,
        // TCP mode: its egress listener is tcp_proxy.
        &["ServicePort_80=10082", "ProxyMode=tcp"],
        &[],
    );
    let survivors = "http://10.78.0.1:2379,http://10.78.0.2:2379";
    let ok = wait_until(WAIT, || has(&catalog_now(survivors), "late", A));
    assert!(ok, "A could not publish during C's partition");
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &[HC_A]), "C stopped routing: {seen:?}");
    fleet.host("c").cut_etcd(&[1, 2], false);
    fleet.host("a").cut_etcd(&[3], false);
    fleet.host("b").cut_etcd(&[3], false);

    let late = fleet.host("c").egress(LATE_EGRESS);
    let t = Instant::now();
    let ok = wait_until(Duration::from_secs(60), || {
        only(&spread(fleet.host("c"), late, 3), &["late@host-a"])
    });
    assert!(ok, "C did not converge after rejoining:\n{}", fleet.logs());
    eprintln!(
        "fleet: C served the new service {:?} after rejoining",
        t.elapsed()
    );
    let stats = fleet.host("c").envoy_get("/stats?filter=egress-late");
    let tcp_cx: u64 = stats
        .lines()
        .filter(|l| l.starts_with("tcp.egress-late") && l.contains(".downstream_cx_total: "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        tcp_cx >= 3 && !stats.lines().any(|l| l.starts_with("http.egress-late")),
        "late's egress is not tcp_proxy:\n{stats}"
    );
    let ok = wait_until(WAIT, || {
        fleet
            .host("c")
            .registrar_get("/healthz")
            .contains(r#""etcd":"connected"#)
            && has(&catalog_now(&all), "web", C)
    });
    assert!(
        ok,
        "C did not republish: {}",
        fleet.host("c").registrar_get("/healthz")
    );
    let errors = etcd_errors(fleet.host("c"));
    assert!(errors > errors_before, "C counted no etcd errors");

    remove(fleet.host("a"), "late");
    remove(fleet.host("c"), "web-c");
    let ok = wait_until(WAIT, || {
        let cat = catalog_now(&all);
        !has(&cat, "late", A) && !has(&cat, "web", C)
    });
    assert!(ok, "late and web-c stayed in the catalog");
}

/// `envoy_docker_etcd_errors_total` on host `h`'s registrar.
fn etcd_errors(h: &hosts::Host) -> u64 {
    h.registrar_get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("envoy_docker_etcd_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Host loss: SIGKILL B's registrar and Envoy. B's proxies take its ports
/// back and keep them answering, but its lease runs out: once the TTL is
/// over no request goes to B. Then B comes back.
#[test]
fn fleet_a_lost_host_leaves_once_its_lease_runs_out() {
    let mut fleet = hold();
    fleet.host("b").kill_registrar();
    fleet.host("b").kill_envoy();
    let t = Instant::now();
    let ceiling = Duration::from_secs(hosts::TTL_SECS) + WAIT;
    let egress = fleet.host("c").egress(WEB_EGRESS);
    let ok = wait_until(ceiling, || {
        only(&spread(fleet.host("c"), egress, 20), &[WEB_A])
    });
    eprintln!(
        "fleet: a lost host stopped getting requests after {:?} (TTL {} s)",
        t.elapsed(),
        hosts::TTL_SECS
    );
    let seen = spread(fleet.host("c"), egress, 100);
    assert!(ok && only(&seen, &[WEB_A]), "after B died: {seen:?}");
    // B's published port kept answering meanwhile, through its proxy.
    let b_port = format!("{}:8080", fleet.host("b").ip()).parse().unwrap();
    let direct = spread(fleet.host("c"), b_port, 5);
    assert!(
        only(&direct, &[WEB_B]),
        "B's port while B is down: {direct:?}"
    );

    fleet.host("b").start_registrar();
    fleet.host("b").start_envoy();
    assert!(
        served_by(&mut fleet, WEB_EGRESS, 20, &[WEB_A, WEB_B]),
        "B did not come back:\n{}",
        fleet.logs()
    );
}

/// A clean stop revokes the lease: A's instances go at once; they come back
/// with A's registrar.
#[test]
fn fleet_a_clean_stop_revokes_the_hosts_lease() {
    let mut fleet = hold();
    fleet.host("a").stop_registrar();
    let all = all_members();
    let ok = wait_until(Duration::from_secs(3), || {
        !catalog_now(&all).iter().any(|i| i.host_id == A)
    });
    assert!(ok, "A's instances outlived its clean stop");
    fleet.host("a").start_registrar();
    let ok = wait_until(WAIT, || {
        let cat = catalog_now(&all);
        has(&cat, "web", A) && has(&cat, "hc", A)
    });
    assert!(ok, "A did not publish again:\n{}", fleet.logs());
}
