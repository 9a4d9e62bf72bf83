//! Bad input of every kind, and the bootstrap's validity in the real Envoy.

use crate::harness::{backend, bin, envoy_bin, free_port, http_get, Ads, ProxySpec, Stack};
use envoy_docker::protocol::{encode_frame, Reply, Request, MAX_FRAME, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

/// Sends raw bytes and reads every reply frame until the registrar closes.
fn exchange(stack: &Stack, bytes: &[u8]) -> Vec<Reply> {
    let mut s = UnixStream::connect(&stack.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("the registrar must close the connection");
    let mut replies = Vec::new();
    let mut at = 0;
    while let Some((r, used)) = envoy_docker::protocol::decode_frame::<Reply>(&raw[at..]).unwrap() {
        replies.push(r);
        at += used;
    }
    assert_eq!(at, raw.len(), "trailing bytes");
    replies
}

fn hello() -> Vec<u8> {
    encode_frame(&Request::Hello {
        version: PROTOCOL_VERSION,
    })
    .unwrap()
}

fn is_error_with(r: &Reply, text: &str) -> bool {
    matches!(r, Reply::Error(e) if e.contains(text))
}

#[test]
fn bad_frames_get_an_error_and_a_close_while_others_are_served() {
    let stack = Stack::start(Ads::Sotw);
    let be = backend::http("127.0.0.16", "still here");
    let port = free_port();
    let _p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();

    // Garbage instead of a hello.
    let r = exchange(&stack, &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
    assert!(r.len() == 1 && is_error_with(&r[0], "malformed"), "{r:?}");
    // An oversized frame after a good hello: refused from its header.
    let mut bytes = hello();
    bytes.extend_from_slice(&((MAX_FRAME as u32) * 16).to_be_bytes());
    let r = exchange(&stack, &bytes);
    assert_eq!(
        r[0],
        Reply::Hello {
            version: PROTOCOL_VERSION
        }
    );
    assert!(is_error_with(&r[1], "limit"), "{r:?}");
    // A valid frame out of turn, and a wrong protocol version.
    let r = exchange(&stack, &encode_frame(&Request::List).unwrap());
    assert!(is_error_with(&r[0], "Hello"), "{r:?}");
    let r = exchange(
        &stack,
        &encode_frame(&Request::Hello { version: 999 }).unwrap(),
    );
    assert!(is_error_with(&r[0], "version"), "{r:?}");
    // Half a frame, then the peer goes away.
    let mut bytes = hello();
    bytes.extend_from_slice(&[0, 0, 1, 0, 1, 2]);
    let mut s = UnixStream::connect(&stack.socket).unwrap();
    s.write_all(&bytes).unwrap();
    drop(s);

    // Nothing was lost and everyone else is still served.
    assert_eq!(stack.status().len(), 1);
    assert_eq!(
        http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/")
            .unwrap()
            .1,
        "still here"
    );
    let other = free_port();
    let _q = stack.proxy(ProxySpec::tcp("127.0.0.1", other, be)).ready();
    assert_eq!(stack.status().len(), 2);
}

#[test]
fn a_non_root_peer_may_look_but_not_register() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root, as CI has"
    );
    let stack = Stack::start(Ads::Sotw);
    // Let uid 65534 reach the socket at all, so the registrar's own check
    // is what refuses it.
    let dir = stack.socket.parent().unwrap();
    for d in [&stack.dir.0, dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&stack.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let be = backend::http("127.0.0.17", "relayed, not registered");
    let port = free_port();
    let mut spec = ProxySpec::tcp("127.0.0.1", port, be);
    spec.uid = Some(65534);
    // Refused by the registrar, the proxy still serves its own port, as
    // docker-proxy would, but root's Envoy never hears of it.
    let mut p = stack.proxy(spec).ready();
    let got = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
    assert_eq!(got, (200, "relayed, not registered".into()));
    assert!(stack.status().is_empty());
    assert!(!stack.listeners().contains(&format!(":{port}")));
    p.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    let err = p.stderr();
    assert!(err.contains("permission denied: uid 65534"), "{err:?}");
    // Listing is allowed.
    let out = Command::new(bin())
        .args(["status", "--socket"])
        .arg(&stack.socket)
        .uid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("PROTO"));
}

use std::os::unix::process::CommandExt;

#[test]
fn bad_proxy_flags_fail_on_fd_3_with_one_line() {
    let stack = Stack::start(Ads::Sotw);
    for (args, want) in [
        (
            vec!["-proto", "tcp", "-bogus", "1"],
            "flag provided but not defined: -bogus",
        ),
        (
            vec![
                "-host-ip",
                "1.2.3",
                "-host-port",
                "1",
                "-container-ip",
                "10.0.0.1",
                "-container-port",
                "1",
            ],
            "not an IP address",
        ),
        (
            vec![
                "-host-port",
                "65536",
                "-container-ip",
                "10.0.0.1",
                "-container-port",
                "1",
            ],
            "port number",
        ),
        (
            vec![
                "-proto",
                "sctp",
                "-host-port",
                "9",
                "-container-ip",
                "10.0.0.1",
                "-container-port",
                "9",
            ],
            "SCTP is not supported",
        ),
        (
            vec![
                "-use-listen-fd",
                "-host-port",
                "9",
                "-container-ip",
                "10.0.0.1",
                "-container-port",
                "9",
            ],
            "fd 4 is not open",
        ),
    ] {
        let mut p = stack.proxy(ProxySpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        let status = p.status();
        assert!(
            status.starts_with("1\n") && status.contains(want),
            "{args:?}: {status:?}"
        );
        assert_eq!(p.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(1));
        let err = p.stderr();
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(err.contains(want));
    }
    // -v prints the version and exits 0, as docker-proxy does.
    let out = Command::new(bin())
        .arg0("docker-proxy")
        .arg("-v")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("envoy-docker"));
}

#[test]
fn registrar_unreachable_means_ready_at_once_and_relaying() {
    let dir = crate::harness::TempDir::new("nosock");
    let socket = dir.path("missing.sock");
    let be = backend::http("127.0.0.19", "no registrar needed");
    let port = free_port();
    let started = std::time::Instant::now();
    let mut spec = ProxySpec::tcp("127.0.0.1", port, be);
    // dockerd discards a proxy's stderr: its messages go to this file too.
    let log = dir.path("proxy.log");
    spec.env
        .push(("ENVOY_DOCKER_PROXY_LOG".into(), log.display().to_string()));
    let mut p = crate::harness::Proxy::spawn(&socket, spec);
    assert_eq!(p.status(), "0\n");
    eprintln!("ready {:?} after spawn", started.elapsed());
    let got = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
    assert_eq!(got, (200, "no registrar needed".into()));
    p.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    // It said once where it looked for the registrar.
    let err = p.stderr();
    assert!(err.contains(&socket.display().to_string()), "{err:?}");
    assert_eq!(err.matches("cannot reach").count(), 1, "{err:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.starts_with(&format!("envoy-docker-proxy[{}]: ", p.pid()))
            && logged.contains("cannot reach"),
        "{logged:?}"
    );
    assert!(crate::harness::refused(SocketAddr::from((
        [127, 0, 0, 1],
        port
    ))));
}

#[test]
fn bootstrap_validates_in_envoy_for_both_ads_modes_and_a_unix_socket() {
    let dir = crate::harness::TempDir::new("bootstrap");
    for args in [
        vec!["bootstrap"],
        vec!["bootstrap", "--ads", "delta"],
        vec![
            "bootstrap",
            "--ads",
            "sotw",
            "--xds",
            "unix:/run/envoy-docker/xds.sock",
        ],
        vec![
            "bootstrap",
            "--ads",
            "delta",
            "--xds",
            "[::1]:18000",
            "--admin",
            "[::1]:9901",
        ],
    ] {
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert!(out.status.success());
        let file = dir.path("envoy.yaml");
        std::fs::write(&file, &out.stdout).unwrap();
        let v = Command::new(envoy_bin())
            .args(["--mode", "validate", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{args:?}: {}\n{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}

#[test]
fn an_envoy_with_another_node_id_is_refused() {
    let stack = Stack::start(Ads::Sotw);
    let dir = crate::harness::TempDir::new("node");
    let config = dir.path("envoy.yaml");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = Command::new(bin())
        .args(["bootstrap", "--node-id", "somebody-else"])
        .args([
            "--xds",
            &stack.xds.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .output()
        .unwrap();
    std::fs::write(&config, &out.stdout).unwrap();
    let mut envoy = Command::new(envoy_bin())
        .arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "-l", "critical"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let refused = crate::harness::wait_until(Duration::from_secs(10), || {
        stack
            .log()
            .contains("node id \"somebody-else\" is not served here")
    });
    // It never gets a configuration, so it never becomes ready.
    let ready = matches!(http_get(admin, "/ready"), Ok((200, _)));
    let _ = envoy.kill();
    let _ = envoy.wait();
    assert!(refused, "{}", stack.log());
    assert!(!ready);
}
