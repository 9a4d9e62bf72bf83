//! An etcd partition, not a kill (issue 19): three etcd members, each in
//! a network namespace of its own on the bridge `edpt0` (10.76.0.1-3;
//! this process is 10.76.0.254), and a registrar with a real Envoy in
//! this process's namespace, following the catalog. The member the
//! registrar's watch is on loses its link (its veth goes down, the
//! process stays alive, so no connection is refused or reset); changes
//! published through the other two members meanwhile must reach the
//! registrar and its Envoy within 10 s.
//!
//! The backends are two listeners on 127.0.0.2 and 127.0.0.3 standing for
//! instances on other hosts, whose records the test writes itself.

use crate::harness::{free_port, http_get, ip, sh, wait_until, Ads, Stack, TempDir};
use envoy_docker::catalog::{self, ContainerInfo, Health, Instance};
use envoy_docker::etcd::{Etcd, Write};
use envoy_docker::mapping::Mode;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BRIDGE: &str = "edpt0";

fn member_url(i: u8) -> String {
    format!("http://10.76.0.{i}:2379")
}

/// Three members in namespaces `edpt-1..3`; all torn down on drop.
struct Cluster {
    members: Vec<Child>,
    dir: TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::cleanup();
        let dir = TempDir::new("partition");
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", "10.76.0.254/24", "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        let cluster = (1..=3)
            .map(|i| format!("p{i}=http://10.76.0.{i}:2380"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 1..=3u8 {
            let ns = format!("edpt-{i}");
            let (outside, inside) = (format!("edpt-{i}"), format!("edpt-{i}i"));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ]);
            ip(&["link", "set", &outside, "master", BRIDGE, "up"]);
            ip(&["link", "set", &inside, "netns", &ns]);
            let addr = format!("10.76.0.{i}/24");
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inside]);
            ip(&["-n", &ns, "link", "set", &inside, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let (client, peer) = (member_url(i), format!("http://10.76.0.{i}:2380"));
            let child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "etcd", "--name", &format!("p{i}")])
                .arg("--data-dir")
                .arg(dir.path(&format!("m{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path(&format!("etcd{i}.log"))).unwrap())
                .spawn()
                .expect("etcd (apt-get install etcd-server)");
            members.push(child);
        }
        let all = (1..=3).map(member_url).collect::<Vec<_>>().join(",");
        let healthy = wait_until(Duration::from_secs(30), || {
            Command::new("etcdctl")
                .args(["--endpoints", &all, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let c = Cluster { members, dir };
        assert!(healthy, "etcd did not start:\n{}", c.logs());
        c
    }

    fn logs(&self) -> String {
        (1..=3)
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.path(&format!("etcd{i}.log")));
                let log = log.unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- etcd{i}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Takes member `i`'s link down (or up): the process lives on.
    fn cut(&self, i: u8, cut: bool) {
        ip(&[
            "link",
            "set",
            &format!("edpt-{i}"),
            if cut { "down" } else { "up" },
        ]);
    }

    fn alive(&mut self, i: u8) -> bool {
        matches!(self.members[usize::from(i) - 1].try_wait(), Ok(None))
    }

    fn cleanup() {
        for i in 1..=3 {
            let _ = sh(Command::new("ip").args(["netns", "delete", &format!("edpt-{i}")]));
            let _ = sh(Command::new("ip").args(["link", "delete", &format!("edpt-{i}")]));
        }
        let _ = sh(Command::new("ip").args(["link", "delete", BRIDGE]));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.members {
            let _ = c.kill();
            let _ = c.wait();
        }
        Cluster::cleanup();
    }
}

/// An HTTP backend that answers every request with its name; it stops
/// when dropped.
struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(ip: &str, name: &'static str) -> Backend {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                );
            }
        });
        Backend { addr, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn record(service: &str, host: &str, at: SocketAddr, service_port: u16) -> (String, Vec<u8>) {
    let i = Instance {
        service: service.into(),
        environment: None,
        host_id: host.into(),
        address: at,
        mode: Mode::Http,
        container: ContainerInfo {
            name: format!("{service}-{host}"),
            id: "0123456789ab".into(),
        },
        image: "backend".into(),
        health: Health::Healthy,
        service_port: Some(service_port),
        mesh_port: None,
        check: None,
    };
    let key = catalog::key(service, host, &format!("tcp_{}", at.port())).unwrap();
    (key, catalog::encode(&i))
}

/// Who answers `n` requests through the egress at `addr` (failures count
/// as "failed").
fn answers(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| match http_get(addr, "/") {
            Ok((200, body)) => body,
            _ => "failed".into(),
        })
        .collect()
}

/// The member the registrar's catalog watch is on, from its /healthz.
fn watched_member(stack: &Stack) -> Option<u8> {
    let (_, body) = http_get(stack.registrar_admin, "/healthz").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let etcd = v["fleet"]["etcd"].as_str()?;
    (1..=3u8).find(|i| etcd.ends_with(&member_url(*i)))
}

#[test]
fn etcd_partition_the_watch_fails_over_and_catches_up() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let mut cluster = Cluster::start();
    // One runtime for the test: an etcd client's connections live on the
    // runtime that made it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b2 = Backend::start("127.0.0.2", "b2");
    let b3 = Backend::start("127.0.0.3", "b3");
    let (web_port, late_port) = (free_port(), free_port());
    let all = (1..=3).map(member_url).collect::<Vec<_>>().join(",");
    let etcd = rt.block_on(Etcd::connect(&all)).unwrap();
    let web2 = record("web", "there-2", b2.addr, web_port);
    let web3 = record("web", "there-3", b3.addr, web_port);
    let writes = [
        Write::Put(web2.0.clone(), web2.1.clone()),
        Write::Put(web3.0.clone(), web3.1.clone()),
    ];
    rt.block_on(etcd.write(&writes, 0)).unwrap();

    let catalog_flag = format!("etcd={all}");
    let stack = Stack::start_with(
        Ads::Sotw,
        &[
            "--catalog",
            &catalog_flag,
            "--advertise",
            "10.76.0.254",
            "--host-id",
            "here",
            "--egress",
            "127.0.0.1",
        ],
    );
    let web = SocketAddr::from(([127, 0, 0, 1], web_port));
    let both = wait_until(Duration::from_secs(30), || {
        let seen = answers(web, 10);
        seen.iter().any(|s| s == "b2") && seen.iter().any(|s| s == "b3")
    });
    assert!(
        both,
        "the egress never reached both: {:?}\n{}",
        answers(web, 4),
        stack.log()
    );
    let watched = watched_member(&stack).unwrap_or_else(|| {
        panic!(
            "/healthz names no member: {:?}",
            http_get(stack.registrar_admin, "/healthz")
        )
    });

    // The cut, and changes published through the two members left.
    cluster.cut(watched, true);
    let cut_at = Instant::now();
    let others = (1..=3u8)
        .filter(|i| *i != watched)
        .map(member_url)
        .collect::<Vec<_>>()
        .join(",");
    let survivors = rt.block_on(Etcd::connect(&others)).unwrap();
    let late = record("late", "there-2", b2.addr, late_port);
    let published = wait_until(Duration::from_secs(10), || {
        rt.block_on(survivors.write(
            &[
                Write::Delete(web3.0.clone()),
                Write::Put(late.0.clone(), late.1.clone()),
            ],
            0,
        ))
        .is_ok()
    });
    assert!(
        published,
        "the two members left took no write:\n{}",
        cluster.logs()
    );
    drop(b3);

    let late_addr = SocketAddr::from(([127, 0, 0, 1], late_port));
    let caught_up = wait_until(Duration::from_secs(10), || {
        answers(late_addr, 1) == ["b2"] && answers(web, 10).iter().all(|s| s == "b2")
    });
    let took = cut_at.elapsed();
    assert!(
        caught_up,
        "10 s after member {watched} was cut off: late {:?}, web {:?}, watch on {:?}\n{}\n{}",
        answers(late_addr, 1),
        answers(web, 5),
        watched_member(&stack),
        stack.log(),
        cluster.logs()
    );
    eprintln!("partition: the registrar caught up {took:?} after member {watched} was cut off");
    assert!(
        cluster.alive(watched),
        "the cut member died: not a partition"
    );
    let now = watched_member(&stack);
    assert!(
        now.is_some_and(|m| m != watched),
        "the watch is not on another member: {now:?}"
    );
    let metrics = stack.registrar_get("/metrics").1;
    assert!(metrics.contains("envoy_docker_etcd_up 1"), "{metrics}");
    cluster.cut(watched, false);
}
