//! The mesh's benchmark (issue 21), run by `bench/mesh.sh` and not by the
//! suite: it times, it asserts nothing about time.
//!
//! Two runs on fresh hosts (`hosts`), one without `--mesh` and one with
//! it, so plain egress and the mesh are measured on the same machine in
//! the same run. In each, nginx serves two services on host A, `keep`
//! (HTTP mode) and `fresh` (TCP mode), and wrk on host C calls them
//! through C's egress, so every request crosses from C to A:
//! - keep-alive: wrk's connections stay open, so do Envoy's to A;
//! - new connections: `Connection: close` to `fresh`, whose TCP mode ties
//!   each client connection to one new connection from C to A (with the
//!   mesh, one TLS handshake, counted by A's Envoy).
//!
//! Then 50 more services start on A, and the registrar's and Envoy's
//! memory (PSS, and Envoy's heap) is measured before and after: the
//! difference between the runs, per service, is what an identity costs.
//! The figures go to stdout and to `target/bench/mesh.json`.

use super::hosts::{self, Fleet, Host};
use super::three_hosts::exclusive;
use crate::harness::{bin, sh, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEEP: u16 = 10090;
const FRESH: u16 = 10091;
const SERVICES: usize = 50;
const WAIT: Duration = Duration::from_secs(120);

fn secs() -> u64 {
    std::env::var("MESH_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// A root and one intermediate per host, for the mesh run.
fn make_ca(dir: &Path) {
    let ca = |args: &[&str]| {
        let out = sh(Command::new(bin()).arg("ca").args(args));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |s: &str| dir.join(s).display().to_string();
    ca(&["init", "--trust-domain", "bench.test", "--out", &p("root")]);
    for h in ["a", "b", "c"] {
        let id = format!("host-{h}");
        ca(&["host", "--ca", &p("root"), "--host-id", &id, "--out", &p(h)]);
    }
}

/// A container that only holds a network namespace and a published port;
/// nginx from this machine then serves in that namespace.
fn service(h: &Host, name: &str, labels: &[String], host_port: u16) -> String {
    let mut args: Vec<String> = vec!["--name".into(), name.into()];
    for l in labels {
        args.extend(["-l".into(), l.clone()]);
    }
    args.extend(["-p".into(), format!("{host_port}:80")]);
    args.extend(hosts::backend_args());
    args.extend([hosts::image().into(), "sleep".into(), "3600".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    h.run(&refs)
}

fn nginx_in(h: &Host, container: &str, dir: &Path) -> Child {
    let out = h.docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let conf = dir.join(format!("nginx-{container}.conf"));
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "master_process off;\npid {d}/nginx-{container}.pid;\nerror_log {d}/nginx-{container}.err;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 80; location / {{ return 200 \"hello\\n\"; }} }} }}\n"
        ),
    )
    .unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "nginx", "-c"])
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (apt-get install nginx-light)")
}

#[derive(Debug, Default)]
struct Wrk {
    rps: f64,
    errors: u64,
}

/// wrk in host `h`'s namespace against `url` for `secs()`.
fn wrk(h: &Host, url: &str, close: bool) -> Wrk {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", h.ns))
        .args(["--", "wrk", "-t1", "-c16"])
        .arg(format!("-d{}s", secs()));
    if close {
        c.args(["-H", "Connection: close"]);
    }
    let out = c.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |key: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(key))?;
        line.split_once(':')?.1.trim().parse().ok()
    };
    let mut w = Wrk {
        rps: field("Requests/sec").unwrap_or_else(|| panic!("wrk said:\n{text}")),
        errors: field("Non-2xx or 3xx responses").unwrap_or(0.0) as u64,
    };
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        w.errors += line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    w
}

/// The sum of the counters whose names end in `suffix` in Envoy's stats.
fn stat_sum(h: &Host, filter: &str, suffix: &str) -> u64 {
    h.envoy_get(&format!("/stats?filter={filter}"))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.ends_with(suffix).then(|| v.trim().parse::<u64>().ok())?
        })
        .sum()
}

fn pss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn envoy_heap_kib(h: &Host) -> u64 {
    let m = h.envoy_get("/memory");
    m.split("\"allocated\":")
        .nth(1)
        .and_then(|r| r.trim().trim_start_matches('"').split('"').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

#[derive(Debug, Default)]
struct Memory {
    registrar_pss: u64,
    envoy_pss: u64,
    envoy_heap: u64,
}

impl Memory {
    fn json(&self) -> String {
        format!(
            "{{\"registrar_pss_kib\":{},\"envoy_pss_kib\":{},\"envoy_heap_kib\":{}}}",
            self.registrar_pss, self.envoy_pss, self.envoy_heap
        )
    }
}

fn memory(h: &Host) -> Memory {
    let (r, e) = h.pids();
    Memory {
        registrar_pss: pss_kib(r),
        envoy_pss: pss_kib(e),
        envoy_heap: envoy_heap_kib(h),
    }
}

#[derive(Debug)]
struct Run {
    mesh: bool,
    keep: Wrk,
    fresh: Wrk,
    handshakes: u64,
    before: Memory,
    after: Memory,
}

fn run(mesh: bool) -> Run {
    let _hosts = exclusive();
    let dir = PathBuf::from(format!("/tmp/ed-mesh-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if mesh {
        make_ca(&dir);
    }
    let ca = dir.clone();
    let mut fleet = Fleet::start_with(move |h| {
        if mesh {
            vec!["--mesh".into(), ca.join(&h.name).display().to_string()]
        } else {
            vec![]
        }
    });
    let mut nginx = Vec::new();
    for (name, mode, egress, port) in [("keep", "http", KEEP, 8090), ("fresh", "tcp", FRESH, 8091)]
    {
        let a = fleet.host("a");
        let labels = [
            format!("ServiceName={name}"),
            format!("ProxyMode={mode}"),
            format!("ServicePort_80={egress}"),
        ];
        service(a, name, &labels, port);
        nginx.push(nginx_in(a, name, &dir));
    }
    let c = fleet.host("c");
    for port in [KEEP, FRESH] {
        let addr = c.egress(port);
        let ok = wait_until(WAIT, || {
            matches!(hosts::in_ns(&c.ns, || hosts::get(addr, "/")), Ok((200, _)))
        });
        assert!(ok, "C's egress {addr} does not reach A");
    }
    let keep = wrk(c, &format!("http://{}/", c.egress(KEEP)), false);
    let a = fleet.host("a");
    let shakes = stat_sum(a, "ssl.handshake", "ssl.handshake");
    let c = fleet.host("c");
    let fresh = wrk(c, &format!("http://{}/", c.egress(FRESH)), true);
    let a = fleet.host("a");
    let handshakes = stat_sum(a, "ssl.handshake", "ssl.handshake") - shakes;

    // Memory: 50 more services on A, each its own identity with the mesh.
    let a = fleet.host("a");
    let listeners = |h: &Host| stat_sum(h, "listener_manager.total_listeners_active", "active");
    // Identities with a leaf: one line each in the registrar's metrics.
    let issued = |h: &Host| {
        h.registrar_get("/metrics")
            .lines()
            .filter(|l| l.starts_with("envoy_docker_mesh_leaves_issued_total{"))
            .count() as u64
    };
    let before = memory(a);
    let (l0, i0) = (listeners(a), issued(a));
    for i in 0..SERVICES {
        let name = format!("svc-{i:02}");
        let labels = [format!("ServiceName={name}"), "ProxyMode=tcp".into()];
        service(a, &name, &labels, 9000 + i as u16);
    }
    let want = SERVICES as u64;
    let ok = wait_until(WAIT, || {
        listeners(a) >= l0 + want && (!mesh || issued(a) >= i0 + want)
    });
    assert!(ok, "A did not serve {SERVICES} more services");
    let after = memory(a);
    for mut n in nginx {
        let _ = n.kill();
        let _ = n.wait();
    }
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        mesh,
        keep,
        fresh,
        handshakes,
        before,
        after,
    }
}

fn per_service(after: u64, before: u64) -> f64 {
    (after as f64 - before as f64) / SERVICES as f64
}

#[test]
#[ignore = "a benchmark: bench/mesh.sh runs it"]
fn bench_mesh_against_plain_egress() {
    let runs = [run(false), run(true)];
    let s = secs() as f64;
    let mut json = Vec::new();
    println!("\n| path | keep-alive req/s | new-connection req/s | handshakes/s | errors | registrar PSS KiB/service | Envoy PSS KiB/service | Envoy heap KiB/service |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &runs {
        let name = if r.mesh {
            "mesh (mTLS)"
        } else {
            "plain egress"
        };
        let reg = per_service(r.after.registrar_pss, r.before.registrar_pss);
        let env = per_service(r.after.envoy_pss, r.before.envoy_pss);
        let heap = per_service(r.after.envoy_heap, r.before.envoy_heap);
        let hs = r.handshakes as f64 / s;
        println!(
            "| {name} | {:.0} | {:.0} | {hs:.0} | {} | {reg:.1} | {env:.1} | {heap:.1} |",
            r.keep.rps,
            r.fresh.rps,
            r.keep.errors + r.fresh.errors
        );
        json.push(format!(
            "{{\"mesh\":{},\"keepalive_rps\":{:.1},\"new_connection_rps\":{:.1},\"handshakes_per_s\":{hs:.1},\
             \"errors\":{},\"registrar_pss_kib_per_service\":{reg:.2},\"envoy_pss_kib_per_service\":{env:.2},\
             \"envoy_heap_kib_per_service\":{heap:.2},\"before\":{},\"after\":{}}}",
            r.mesh,
            r.keep.rps,
            r.fresh.rps,
            r.keep.errors + r.fresh.errors,
            r.before.json(),
            r.after.json(),
        ));
    }
    let (p, m) = (&runs[0], &runs[1]);
    println!(
        "\nmesh/plain: keep-alive {:.2}x, new connections {:.2}x; an identity costs the registrar {:.1} KiB and Envoy {:.1} KiB (PSS) more than a plain service",
        m.keep.rps / p.keep.rps,
        m.fresh.rps / p.fresh.rps,
        per_service(m.after.registrar_pss, m.before.registrar_pss)
            - per_service(p.after.registrar_pss, p.before.registrar_pss),
        per_service(m.after.envoy_pss, m.before.envoy_pss)
            - per_service(p.after.envoy_pss, p.before.envoy_pss),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("mesh.json"), format!("[{}]\n", json.join(",\n"))).unwrap();
}
