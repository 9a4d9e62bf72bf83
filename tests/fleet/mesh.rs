//! The mesh (`serve --mesh`) on three hosts (`hosts`), each with its own
//! intermediate from one root made by `envoy-docker ca`: real etcd, real
//! Envoy, real dockerd. `web` runs on A and B (HTTP, `MeshAllow=frontend`),
//! `solo` on A only (no `MeshAllow`); callers run on C.
//!
//! One test, in steps, because the hosts are costly to set up and each
//! step builds on the last; it holds the hosts alone (`exclusive`).

use super::hosts::{self, Fleet, Host};
use super::three_hosts::{backend, exclusive};
use crate::harness::{bin, sh, wait_until};
use envoy_docker::mesh::check::load_host;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

const TD: &str = "mesh.test";
const WEB_EGRESS: u16 = 10080;
const SOLO_EGRESS: u16 = 10081;
const WAIT: Duration = Duration::from_secs(60);

fn ca(args: &[&str]) {
    let out = sh(Command::new(bin()).arg("ca").args(args));
    assert!(
        out.status.success(),
        "ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The root, one intermediate per host, and a second root's intermediate
/// for host B.
fn make_ca(dir: &Path) {
    let p = |s: &str| dir.join(s).display().to_string();
    ca(&["init", "--trust-domain", TD, "--out", &p("root")]);
    for h in ["a", "b", "c"] {
        let id = format!("host-{h}");
        ca(&["host", "--ca", &p("root"), "--host-id", &id, "--out", &p(h)]);
    }
    ca(&["init", "--trust-domain", TD, "--out", &p("rogue-root")]);
    ca(&[
        "host",
        "--ca",
        &p("rogue-root"),
        "--host-id",
        "host-b",
        "--out",
        &p("rogue-b"),
    ]);
    // A key that others may read is refused at start.
    let exposed = dir.join("a/host.key");
    let mode =
        |m| std::fs::set_permissions(&exposed, std::os::unix::fs::PermissionsExt::from_mode(m));
    mode(0o644).unwrap();
    let e = load_host(&dir.join("a")).unwrap_err().to_string();
    assert!(e.contains("readable by group or others"), "{e}");
    mode(0o600).unwrap();
}

/// `n` GETs from container `from` on `h` to `h`'s egress `port`; who
/// answered (the `Server` header), `403`, or `failed`.
fn call(h: &Host, from: &str, port: u16, n: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{}/", h.egress(port));
    let script = format!(
        "import urllib.request, urllib.error\n\
         for _ in range({n}):\n\
         \x20   try:\n\
         \x20       r = urllib.request.urlopen('{url}', timeout=5)\n\
         \x20       print('=', r.headers.get('Server'))\n\
         \x20   except urllib.error.HTTPError as e:\n\
         \x20       print('=', e.code)\n\
         \x20   except Exception as e:\n\
         \x20       print('= failed:', type(e).__name__, e)\n"
    );
    let out = h.docker(&["exec", from, "/usr/bin/python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut seen = BTreeMap::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("= ")) {
        *seen.entry(line.to_string()).or_insert(0) += 1;
    }
    if seen.is_empty() {
        seen.insert(
            format!("failed: {}", String::from_utf8_lossy(&out.stderr)),
            1,
        );
    }
    seen
}

fn only(seen: &BTreeMap<String, usize>, want: &[&str]) -> bool {
    seen.keys().all(|k| want.contains(&k.as_str())) && want.iter().all(|w| seen.contains_key(*w))
}

/// `openssl s_client` from C to A's mesh port for `web`, with a client
/// certificate or none; what the server answered to one GET.
fn s_client(h: &Host, to: &str, cert: Option<(&Path, &Path)>, root: &Path) -> String {
    let mut c = Command::new("ip");
    c.args([
        "netns", "exec", &h.ns, "timeout", "10", "openssl", "s_client",
    ])
    .args(["-connect", to, "-servername", &format!("web.{TD}")])
    .arg("-CAfile")
    .arg(root)
    .args(["-quiet", "-ign_eof"]);
    if let Some((cert, key)) = cert {
        // The leaf, its key, and the intermediate it was issued from
        // (s_client sends only the first certificate of `-cert`).
        let intermediate = cert.with_file_name("host.pem");
        c.arg("-cert").arg(cert).arg("-key").arg(key);
        c.arg("-cert_chain").arg(intermediate);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A leaf for `id` from the intermediate in `dir`, valid from `from` to
/// `to`, written as `<name>.pem` and `<name>.key`.
fn leaf(dir: &Path, id: &str, from: SystemTime, to: SystemTime, name: &str) -> (PathBuf, PathBuf) {
    let l = load_host(dir)
        .unwrap()
        .signer
        .leaf_between(id, from, to)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let leaf_only = l
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    std::fs::write(&c, leaf_only).unwrap();
    std::fs::write(&k, &l.key_pem).unwrap();
    (c, k)
}

/// How often each host's registrar has issued its own host identity.
fn issued(fleet: &Fleet) -> Vec<usize> {
    fleet
        .hosts
        .iter()
        .map(|h| {
            let id = format!("mesh: issued spiffe://{TD}/host/{}", h.host_id());
            h.read_log("serve.log").matches(&id).count()
        })
        .collect()
}

fn rbac_denied(h: &Host) -> u64 {
    h.envoy_get("/stats?filter=rbac.denied$")
        .lines()
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum()
}

/// The sum of the registrar's `family` samples whose labels hold every one
/// of `has`.
fn counted(h: &Host, family: &str, has: &[&str]) -> u64 {
    h.registrar_get("/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && has.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn mesh_mutual_tls_identities_allow_lists_and_rotation_across_three_hosts() {
    let _hosts = exclusive();
    let dir = PathBuf::from(format!("/tmp/ed-mesh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir);
    let mesh_dir = dir.clone();
    let mut fleet = Fleet::start_with(move |h| {
        vec![
            "--mesh".into(),
            mesh_dir.join(&h.name).display().to_string(),
            "--mesh-leaf-ttl".into(),
            "20s".into(),
        ]
    });
    let web = [
        "ServicePort_80=10080",
        "ProxyMode=http",
        "MeshAllow=frontend",
    ];
    backend(fleet.host("a"), "web-a", "web", 8080, &web, &[]);
    backend(fleet.host("b"), "web-b", "web", 8080, &web, &[]);
    let solo = ["ServicePort_80=10081", "ProxyMode=http"];
    backend(fleet.host("a"), "solo", "solo", 8081, &solo, &[]);
    let c = fleet.host("c");
    for (name, label) in [
        ("frontend", "ServiceName=frontend"),
        ("stranger", "Role=none"),
    ] {
        let mut args = vec!["--name".to_string(), name.into(), "-l".into(), label.into()];
        args.extend(hosts::backend_args());
        args.extend([hosts::image().to_string(), "sleep".into(), "600".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        c.run(&refs);
    }

    // 1. The frontend reaches web on A and B through their mesh ports; a
    // capture on the hosts' bridge shows TLS there, and no HTTP in clear
    // (a plain GET to A's published port, in the same capture, shows what
    // clear text would look like).
    let c = fleet.host("c");
    let ok = wait_until(WAIT, || {
        only(
            &call(c, "frontend", WEB_EGRESS, 20),
            &["web@host-a", "web@host-b"],
        )
    });
    assert!(
        ok,
        "frontend on C is not served by web on A and B: {:?}\n{}\n{}",
        call(c, "frontend", WEB_EGRESS, 5),
        c.envoy_get("/clusters"),
        fleet.logs()
    );
    let pcap = dir.join("bridge.pcap");
    let mut dump = Command::new("tcpdump")
        .args(["-i", "edfl-c", "--immediate-mode", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .args(["tcp port 15443 or tcp port 8080"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    // tcpdump says "listening on" once its capture is in place; in
    // immediate mode it writes each packet as it comes, so none is still
    // in the ring buffer when it is stopped.
    let mut err = dump.stderr.take().unwrap();
    let mut line = [0u8; 256];
    let _ = std::io::Read::read(&mut err, &mut line);
    let served = call(c, "frontend", WEB_EGRESS, 20);
    let plain = hosts::in_ns(&c.ns, || {
        hosts::get("10.77.0.1:8080".parse().unwrap(), "/clear")
    });
    // The clear request is the last thing sent: once it is in the file,
    // so is everything before it.
    let seen_clear = |p: &Path| {
        let b = std::fs::read(p).unwrap_or_default();
        b.windows(10).any(|w| w == b"GET /clear")
    };
    wait_until(Duration::from_secs(5), || seen_clear(&pcap));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = dump.wait();
    assert!(only(&served, &["web@host-a", "web@host-b"]), "{served:?}");
    assert_eq!(plain.unwrap().0, 200);
    let captured = std::fs::read(&pcap).unwrap();
    let has = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(b"GET /clear HTTP/1.1"),
        "the capture saw no clear text at all"
    );
    // The frontend's requests are for `/`; the clear one was `/clear`.
    assert!(!has(b"GET / HTTP/1.1"), "HTTP in clear on the mesh");
    // TLS application data records (content type 23, TLS 1.2 framing,
    // which TLS 1.3 keeps); Envoy keeps its upstream connections, so the
    // handshakes may all have happened before the capture.
    assert!(has(&[0x17, 0x03, 0x03]), "no TLS seen");

    // 2. MeshAllow=frontend: another container on C is refused (403 from
    // HTTP's RBAC) and counted; a caller without a service name of its own
    // is C's host identity, which `solo` (no MeshAllow) serves.
    let before = rbac_denied(fleet.host("a")) + rbac_denied(fleet.host("b"));
    let refused = call(fleet.host("c"), "stranger", WEB_EGRESS, 10);
    assert_eq!(refused.get("403"), Some(&10), "{refused:?}");
    let after = rbac_denied(fleet.host("a")) + rbac_denied(fleet.host("b"));
    assert!(
        after >= before + 10,
        "RBAC denials went from {before} to {after}"
    );
    // The registrars count each refusal by service and caller (the
    // stranger is C's host identity), from Envoy's access-log stream.
    let stranger = format!("caller=\"spiffe://{TD}/host/host-c\"");
    let denied = |f: &mut Fleet| {
        ["a", "b"]
            .iter()
            .map(|h| {
                counted(
                    f.host(h),
                    "envoy_docker_mesh_denied_total",
                    &["service=\"web\"", &stranger],
                )
            })
            .sum::<u64>()
    };
    let ok = wait_until(WAIT, || denied(&mut fleet) >= 10);
    assert!(
        ok,
        "denials counted: {}\n{}",
        denied(&mut fleet),
        fleet.host("a").registrar_get("/metrics")
    );
    let solo_seen = call(fleet.host("c"), "stranger", SOLO_EGRESS, 5);
    assert_eq!(solo_seen.get("solo@host-a"), Some(&5), "{solo_seen:?}");

    // 3. At A's mesh port directly: no client certificate, one from
    // another root, and an expired one from the right chain are refused;
    // a valid leaf from C's intermediate is served (the check can fail).
    let root = dir.join("root/root.pem");
    let to = "10.77.0.1:15443";
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let frontend = format!("spiffe://{TD}/svc/frontend");
    let good = leaf(&dir.join("c"), &frontend, now - hour, now + hour, "good");
    let rogue = leaf(
        &dir.join("rogue-b"),
        &frontend,
        now - hour,
        now + hour,
        "rogue",
    );
    let expired = leaf(
        &dir.join("c"),
        &frontend,
        now - 2 * hour,
        now - hour,
        "expired",
    );
    let c = fleet.host("c");
    let answer = s_client(c, to, Some((&good.0, &good.1)), &root);
    assert!(
        answer.contains("HTTP/1.1 200"),
        "a valid leaf was not served:\n{answer}"
    );
    for (what, cert) in [
        ("no client certificate", None),
        ("another root's leaf", Some((&rogue.0, &rogue.1))),
        ("an expired leaf", Some((&expired.0, &expired.1))),
    ] {
        let answer = s_client(c, to, cert.map(|(a, b)| (a.as_path(), b.as_path())), &root);
        assert!(!answer.contains("HTTP/1.1"), "{what} was served:\n{answer}");
    }
    // A counts the three failed handshakes and the good one, and `status
    // --fleet` shows its identities and calls.
    let a = fleet.host("a");
    let good_caller = format!("caller=\"{frontend}\"");
    let ok = wait_until(WAIT, || {
        counted(
            a,
            "envoy_docker_mesh_handshakes_total",
            &["outcome=\"failed\""],
        ) >= 3
            && counted(
                a,
                "envoy_docker_mesh_handshakes_total",
                &["service=\"web\"", &good_caller, "outcome=\"ok\""],
            ) >= 1
    });
    assert!(
        ok,
        "handshakes not counted:\n{}",
        a.registrar_get("/metrics")
    );
    let out = a.status(&["--fleet"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("spiffe://{TD}/svc/web "))),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("web ") && l.contains(&frontend)),
        "{text}"
    );
    // The dashboard's fleet view reads the same from /api/v1/fleet.
    let api: serde_json::Value =
        serde_json::from_str(&a.registrar_get("/api/v1/fleet")).unwrap_or_default();
    let ids = api["mesh"]["identities"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        ids.iter()
            .any(|i| i["identity"] == format!("spiffe://{TD}/svc/web")),
        "{api}"
    );
    let calls = api["mesh"]["calls"].as_array().cloned().unwrap_or_default();
    assert!(
        calls
            .iter()
            .any(|c| c["service"] == "web" && c["caller"] == frontend.as_str()),
        "{api}"
    );

    // 4. Rotation under load (20 s leaves): every host renews its host
    // identity at least three times while the frontend keeps calling, and
    // no request fails.
    let start = issued(&fleet);
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    while issued(&fleet).iter().zip(&start).any(|(n, s)| n < &(s + 3)) {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than three rotations per host: {start:?} then {:?}",
            issued(&fleet)
        );
        for (k, v) in call(fleet.host("c"), "frontend", WEB_EGRESS, 10) {
            *total.entry(k).or_insert(0) += v;
        }
    }
    assert!(
        only(&total, &["web@host-a", "web@host-b"]),
        "requests failed during rotation: {total:?}"
    );

    // The registrar's /metrics says when each leaf expires, and counts
    // the rotations.
    let metrics = fleet.host("c").registrar_get("/metrics");
    let id = format!("identity=\"spiffe://{TD}/host/host-c\"");
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&id))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    let unix_now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = line("envoy_docker_mesh_leaf_expiry_seconds").unwrap_or(0);
    assert!(expiry > unix_now, "{metrics}");
    let issued_c = line("envoy_docker_mesh_leaves_issued_total").unwrap_or(0);
    assert!(issued_c >= 4, "{metrics}");

    // 5. One trace spans C's egress and the serving host's mesh ingress.
    let ok = wait_until(WAIT, || {
        let _ = call(fleet.host("c"), "frontend", WEB_EGRESS, 1);
        let spans = fleet.otlp.spans();
        spans.iter().any(|e| {
            e.service == "egress-web"
                && spans
                    .iter()
                    .any(|s| s.service == "mesh-in-web" && s.trace_id == e.trace_id)
        })
    });
    let services: Vec<String> = fleet
        .otlp
        .spans()
        .iter()
        .map(|s| s.service.clone())
        .collect();
    assert!(ok, "no trace across the mesh: {services:?}");

    // 6. B restarted with an intermediate of another root: it can neither
    // be called (C's frontend gets only A) nor call (B reaches nothing of
    // `solo`, which only A has), while C still reaches `solo`.
    let rogue_dir = dir.join("rogue-b").display().to_string();
    let b = fleet.host("b");
    b.stop_registrar();
    let at = b.serve_args.iter().position(|a| a == "--mesh").unwrap();
    b.serve_args[at + 1] = rogue_dir;
    b.start_registrar();
    let c = fleet.host("c");
    let ok = wait_until(WAIT, || {
        let seen = call(c, "frontend", WEB_EGRESS, 20);
        !seen.contains_key("web@host-b") && seen.contains_key("web@host-a")
    });
    // Connections C opened to B under the old trust are drained, not kept.
    if !ok {
        let seen = call(c, "frontend", WEB_EGRESS, 10);
        let pools = c.envoy_get("/stats?filter=egress-web.*(cx_active|ssl.handshake|cx_destroy)");
        let b_in = fleet.host("b").envoy_get("/stats?filter=mesh_in|15443");
        panic!("C still reaches B: {seen:?}\nC's pools:\n{pools}\nB's ingress:\n{b_in}");
    }
    let c = fleet.host("c");
    let seen = call(c, "frontend", WEB_EGRESS, 20);
    assert!(!seen.contains_key("web@host-b"), "{seen:?}");
    let b = fleet.host("b");
    let b_solo = hosts::in_ns(&b.ns, || hosts::get(b.egress(SOLO_EGRESS), "/"));
    assert!(
        !matches!(b_solo, Ok((200, _))),
        "B with a foreign intermediate reached solo on A: {b_solo:?}"
    );
    let c = fleet.host("c");
    assert_eq!(
        call(c, "stranger", SOLO_EGRESS, 3).get("solo@host-a"),
        Some(&3)
    );

    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
}
