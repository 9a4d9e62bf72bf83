//! The fleet against real parts: the etcd client and the catalog's records
//! on one etcd on loopback; then three Docker hosts as network namespaces
//! (`hosts`), each with its own dockerd, registrar, Envoy and etcd member,
//! through the issue's scenarios in one run (setting the hosts up is the
//! costly part).

mod hosts;
mod partition;

use crate::harness::{free_port, wait_until, TempDir};
use envoy_docker::catalog::{self, ContainerInfo, Health, Instance};
use envoy_docker::etcd::{Etcd, Event, Write};
use envoy_docker::mapping::Mode;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member on 127.0.0.1, killed on drop.
struct EtcdServer {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl EtcdServer {
    fn start() -> EtcdServer {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path("data"))
            .args(["--name", "m1"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m1={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("etcd.log")).unwrap())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let probe = url.clone();
        assert!(
            wait_until(Duration::from_secs(20), || {
                Command::new("etcdctl")
                    .args(["--endpoints", &probe, "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output()
                    .is_ok_and(|o| o.status.success())
            }),
            "etcd did not start"
        );
        EtcdServer {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance(host: &str, port: u16) -> Instance {
    Instance {
        service: "web".into(),
        environment: None,
        host_id: host.into(),
        address: format!("10.0.0.1:{port}").parse().unwrap(),
        mode: Mode::Http,
        container: ContainerInfo {
            name: "web1".into(),
            id: "abc".into(),
        },
        image: "nginx".into(),
        health: Health::Healthy,
        service_port: Some(10080),
        check: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn etcd_client_leases_and_catalog_records_on_a_real_etcd() {
    let server = EtcdServer::start();
    // A dead member first: the client goes on to the live one.
    let etcd = Etcd::connect(&format!("http://127.0.0.1:1,{}", server.url))
        .await
        .unwrap();

    let lease = etcd.grant(10).await.unwrap();
    let mut kept = etcd.keep_alive(lease).await.unwrap().expect("a live lease");
    assert!(kept.renew().await.unwrap() > 0);
    let a = instance("host-a", 8080);
    let b = instance("host-b", 8081);
    let key_a = catalog::key("web", "host-a", "tcp_0-0-0-0_8080").unwrap();
    let key_b = catalog::key("web", "host-b", "tcp_0-0-0-0_8081").unwrap();
    etcd.put(&key_a, &catalog::encode(&a), lease).await.unwrap();
    etcd.put(&key_b, &catalog::encode(&b), 0).await.unwrap();
    etcd.put("/envoy-docker/v1/instancesX", b"outside", 0)
        .await
        .unwrap();

    let (rev, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert!(rev > 0);
    assert_eq!(kvs.len(), 2, "{kvs:?}");
    assert_eq!(kvs[0].key, key_a);
    assert_eq!(kvs[0].lease, lease);
    assert_eq!(catalog::decode(&kvs[0].value).unwrap(), a);
    assert_eq!(catalog::decode(&kvs[1].value).unwrap(), b);
    // etcdctl, the operator's view, reads the same JSON.
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &server.url,
            "get",
            &key_b,
            "--print-value-only",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert_eq!(
        catalog::decode(String::from_utf8_lossy(&out.stdout).trim().as_bytes()).unwrap(),
        b
    );

    // Revoking the lease takes its keys with it; the other stays.
    etcd.revoke(lease).await.unwrap();
    assert_eq!(kept.renew().await.unwrap(), 0);
    assert!(etcd.keep_alive(lease).await.unwrap().is_none());
    let (_, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        [key_b.as_str()]
    );
    etcd.delete(&key_b).await.unwrap();
    assert!(etcd.get_prefix(catalog::PREFIX).await.unwrap().1.is_empty());

    // A lease nobody keeps alive expires, and its keys go.
    let short = etcd.grant(1).await.unwrap();
    etcd.put(&key_a, b"{}", short).await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if etcd.get_prefix(catalog::PREFIX).await.unwrap().1.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the key outlived its lease");

    // A watch from the revision after a read sees every change, in order.
    let (rev, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    let mut watch = etcd.watch_prefix(catalog::PREFIX, rev + 1).await.unwrap();
    etcd.put(&key_a, &catalog::encode(&a), 0).await.unwrap();
    etcd.put("/elsewhere", b"not watched", 0).await.unwrap();
    etcd.delete(&key_a).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (_, events) = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("no watch event in 10 s")
            .unwrap();
        seen.extend(events);
    }
    match &seen[0] {
        Event::Put(kv) => {
            assert_eq!(kv.key, key_a);
            assert_eq!(catalog::decode(&kv.value).unwrap(), a);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(seen[1], Event::Delete(key_a.clone()));
    // History etcd has compacted away is an error that says so.
    let (now, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    let out = Command::new("etcdctl")
        .args(["--endpoints", &server.url, "compact", &now.to_string()])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut old = etcd.watch_prefix(catalog::PREFIX, rev).await.unwrap();
    assert!(matches!(
        old.next().await,
        Err(envoy_docker::etcd::Error::Compacted(_))
    ));

    // More writes than one transaction takes go in several, in order.
    let many: Vec<Write> = (0..300)
        .map(|i| Write::Put(format!("{}batch/{i:03}", catalog::PREFIX), b"x".to_vec()))
        .chain((0..150).map(|i| Write::Delete(format!("{}batch/{i:03}", catalog::PREFIX))))
        .collect();
    etcd.write(&many, 0).await.unwrap();
    let (_, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert_eq!(kvs.len(), 150);
    assert!(kvs[0].key.ends_with("batch/150"), "{:?}", kvs[0]);

    // etcd's own refusals are errors, not panics.
    assert!(etcd.put(&key_a, b"x", 12345).await.is_err());
    drop(server);
    assert!(etcd.grant(5).await.is_err());
}

/// The catalog as etcd holds it now, read through members `urls`.
fn catalog_now(urls: &str) -> Vec<Instance> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::connect(urls)).unwrap();
    let (_, kvs) = rt.block_on(etcd.get_prefix(catalog::PREFIX)).unwrap();
    kvs.iter()
        .map(|kv| catalog::decode(&kv.value).unwrap())
        .collect()
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

/// A web backend on `h`: `--server <service>@host-<name>`, /health as
/// the file /tmp/health says, published on `host_port`.
fn backend(
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

/// Collects every watch event under the prefix from now until `stop`.
fn watch_events(urls: &str, stop: std::sync::mpsc::Receiver<()>) -> Vec<Event> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::connect(urls)).unwrap();
    rt.block_on(async move {
        let (rev, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
        let mut watch = etcd.watch_prefix(catalog::PREFIX, rev + 1).await.unwrap();
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

const WEB: &str = "ServicePort_80=10080";
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn fleet_three_hosts_etcd_health_faults_and_traces() {
    let mut fleet = hosts::Fleet::start();
    let all = hosts::Fleet::etcd_urls(1);
    let (a_id, b_id, c_id) = ("host-a", "host-b", "host-c");
    let web_a = "web@host-a";
    let web_b = "web@host-b";
    // Sidecar's form on A (the first host, whose check the egress
    // clusters use), ours on B.
    let sidecar = [
        "HealthCheck=HttpGet",
        "HealthCheckArgs=http://{{ host }}:{{ tcp 80 }}/health",
        "HealthCheckInterval=1s",
    ];
    backend(
        fleet.host("a"),
        "web-a",
        "web",
        8080,
        &[WEB, sidecar[0], sidecar[1], sidecar[2]],
        &[],
    );
    let ours = ["HealthCheck=http:/health", "HealthCheckInterval=1s"];
    backend(
        fleet.host("b"),
        "web-b",
        "web",
        8080,
        &[WEB, ours[0], ours[1]],
        &[],
    );
    // Kept out of the catalog, as in Sidecar.
    backend(
        fleet.host("b"),
        "hidden",
        "hidden",
        8090,
        &["ServicePort_80=10090", "SidecarDiscover=false"],
        &[],
    );

    // 1. Spread: both instances answer through host C's egress.
    let c_egress = fleet.host("c").egress(10080);
    let t = Instant::now();
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), c_egress, 20), &[web_a, web_b])
    });
    if !ok && std::env::var_os("ED_DEBUG").is_some() {
        std::thread::sleep(Duration::from_secs(300));
    }
    assert!(
        ok,
        "C's egress never reached both: {:?}\n{}\n{}\n{}",
        spread(fleet.host("c"), c_egress, 5),
        fleet.host("c").envoy_get("/clusters"),
        fleet.host("c").envoy_get("/listeners"),
        fleet.logs()
    );
    eprintln!(
        "fleet: C's egress reached A and B {:?} after `docker run` returned",
        t.elapsed()
    );
    let seen = spread(fleet.host("c"), c_egress, 200);
    assert!(only(&seen, &[web_a, web_b]), "{seen:?}");
    let cat = catalog_now(&all);
    assert!(has(&cat, "web", a_id) && has(&cat, "web", b_id), "{cat:?}");
    let i = cat.iter().find(|i| i.host_id == a_id).unwrap();
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

    // 3. Health: an instance whose /health fails gets no requests within
    // two check intervals, and gets them again once healthy.
    exec(fleet.host("a"), "web-a", "echo sick > /tmp/health");
    let t = Instant::now();
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), c_egress, 10), &[web_b])
    });
    eprintln!(
        "fleet: a sick instance stopped getting requests after {:?}",
        t.elapsed()
    );
    let seen = spread(fleet.host("c"), c_egress, 50);
    assert!(ok && only(&seen, &[web_b]), "sick A still served: {seen:?}");
    exec(fleet.host("a"), "web-a", "echo ok > /tmp/health");
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), c_egress, 20), &[web_a, web_b])
    });
    assert!(ok, "A did not come back");

    // 7. Docker's own HEALTHCHECK (real dockerd): unhealthy leaves the
    // egress cluster and the catalog says so; healthy comes back.
    backend(
        fleet.host("a"),
        "hc",
        "hc",
        8081,
        // HTTP mode, for the trace below.
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
    let hc = fleet.host("c").egress(10081);
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), hc, 5), &["hc@host-a"])
    });
    assert!(ok, "hc never served through C's egress:\n{}", fleet.logs());
    exec(fleet.host("a"), "hc", "echo sick > /tmp/h");
    let t = Instant::now();
    let ok = wait_until(WAIT, || {
        let cat = catalog_now(&all);
        cat.iter()
            .any(|i| i.service == "hc" && i.health == Health::Unhealthy)
    });
    assert!(ok, "Docker's unhealthy never reached the catalog");
    eprintln!(
        "fleet: Docker's unhealthy reached the catalog in {:?}",
        t.elapsed()
    );
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
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), hc, 5), &["hc@host-a"])
    });
    assert!(ok, "hc did not come back when healthy");

    // 8. Trace: one request from C through egress to A is one trace, with
    // spans from both hosts' Envoys.
    let ok = wait_until(WAIT, || {
        let spans = fleet.otlp.spans();
        spans.iter().any(|egress| {
            egress.service == "egress-hc"
                && spans
                    .iter()
                    .any(|s| s.service == "hc" && s.trace_id == egress.trace_id)
        })
    });
    assert!(ok, "no shared trace: {:#?}", fleet.otlp.spans());

    // 6. Registrar restart on A: its instances never leave the catalog.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let urls = all.clone();
    let watcher = std::thread::spawn(move || watch_events(&urls, stop_rx));
    std::thread::sleep(Duration::from_millis(500));
    fleet.host("a").kill_registrar();
    fleet.host("a").start_registrar();
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
    let cat = catalog_now(&all);
    assert!(has(&cat, "web", a_id) && has(&cat, "hc", a_id), "{cat:?}");

    // 4. etcd member loss: publishing and routing go on.
    fleet.host("b").kill_etcd();
    backend(fleet.host("c"), "web-c", "web", 8080, &[WEB], &[]);
    let survivors = "http://10.78.0.1:2379,http://10.78.0.3:2379";
    let ok = wait_until(WAIT, || has(&catalog_now(survivors), "web", c_id));
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
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &["hc@host-a"]), "{seen:?}");
    fleet.host("b").restart_etcd(&hosts::Fleet::etcd_cluster());
    let ok = wait_until(WAIT, || {
        hosts::etcdctl(&all, &["endpoint", "health", "--cluster"])
            .status
            .success()
    });
    assert!(ok, "member B did not rejoin");

    // 5. Partition: C is cut off from etcd, keeps routing with the last
    // catalog, and converges after it rejoins.
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
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &["hc@host-a"]), "C stopped routing: {seen:?}");
    backend(
        fleet.host("a"),
        "late",
        "late",
        8082,
        // TCP mode: its egress listener is tcp_proxy.
        &["ServicePort_80=10082", "ProxyMode=tcp"],
        &[],
    );
    let ok = wait_until(WAIT, || has(&catalog_now(survivors), "late", a_id));
    assert!(ok, "A could not publish during C's partition");
    let seen = spread(fleet.host("c"), hc, 20);
    assert!(only(&seen, &["hc@host-a"]), "C stopped routing: {seen:?}");
    fleet.host("c").cut_etcd(&[1, 2], false);
    fleet.host("a").cut_etcd(&[3], false);
    fleet.host("b").cut_etcd(&[3], false);
    let late = fleet.host("c").egress(10082);
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
            && has(&catalog_now(&all), "web", c_id)
    });
    assert!(
        ok,
        "C did not republish: {}",
        fleet.host("c").registrar_get("/healthz")
    );
    assert!(fleet
        .host("c")
        .registrar_get("/metrics")
        .lines()
        .any(|l| l.starts_with("envoy_docker_etcd_errors_total ") && !l.ends_with(" 0")));

    // A stopped container's key goes at once.
    let out = fleet.host("c").docker(&["rm", "-f", "web-c"]);
    assert!(out.status.success());
    let t = Instant::now();
    let ok = wait_until(Duration::from_secs(5), || {
        !has(&catalog_now(&all), "web", c_id)
    });
    eprintln!(
        "fleet: a removed container's key went {:?} after docker rm",
        t.elapsed()
    );
    assert!(ok, "web-c's key stayed after its container stopped");

    // 2. Host loss: SIGKILL B's registrar and Envoy. B's proxies take its
    // ports back and keep them answering, but its lease runs out: within
    // the TTL plus 2 s no request goes to B, and none fails after that.
    let ok = wait_until(WAIT, || {
        only(&spread(fleet.host("c"), c_egress, 20), &[web_a, web_b])
    });
    assert!(ok, "C's egress did not spread over A and B again");
    fleet.host("b").kill_registrar();
    fleet.host("b").kill_envoy();
    std::thread::sleep(Duration::from_secs(hosts::TTL_SECS + 2));
    let seen = spread(fleet.host("c"), c_egress, 100);
    assert!(only(&seen, &[web_a]), "after B died: {seen:?}");

    // A clean stop revokes the lease: A's instances go at once.
    fleet.host("a").stop_registrar();
    let ok = wait_until(Duration::from_secs(3), || {
        !catalog_now(&all).iter().any(|i| i.host_id == a_id)
    });
    assert!(ok, "A's instances outlived its clean stop");
}
