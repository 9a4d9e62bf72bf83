//! How mappings end and survive: SIGINT, SIGKILL, bind conflicts, and
//! registrar restarts with recovery or with resync.

use crate::harness::watch::Watch;
use crate::harness::{backend, free_port, http_get, refused, wait_until, Ads, ProxySpec, Stack};
use nix::sys::signal::Signal;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

#[test]
fn sigint_deregisters_exits_zero_and_closes_the_port() {
    let stack = Stack::start(Ads::Sotw);
    let be = backend::http("127.0.0.8", "bye");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    assert_eq!(http_get(addr, "/").unwrap().0, 200);
    let start = Instant::now();
    p.signal(Signal::SIGINT);
    let st = p
        .wait_exit(Duration::from_secs(2))
        .expect("no exit within 2 s");
    assert_eq!(st.code(), Some(0));
    eprintln!("proxy exited {:?} after SIGINT", start.elapsed());
    // Deregistration waits (boundedly) for Envoy: within 2 s of the signal
    // the port is closed.
    assert!(
        wait_until(
            Duration::from_secs(2).saturating_sub(start.elapsed()),
            || refused(addr)
        ),
        "port still open 2 s after SIGINT"
    );
    assert!(!stack.listeners().contains(&format!("127.0.0.1:{port}")));
    assert!(stack.status().is_empty());

    // SIGTERM (dockerd's parent-death signal) does the same.
    let mut p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    let start = Instant::now();
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(2)).unwrap().code(), Some(0));
    assert!(wait_until(
        Duration::from_secs(2).saturating_sub(start.elapsed()),
        || refused(addr)
    ));
}

#[test]
fn sigkill_of_a_proxy_removes_its_listener_within_two_seconds() {
    let stack = Stack::start(Ads::Delta);
    let be = backend::http("127.0.0.9", "killed");
    let port = free_port();
    let p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    assert!(stack.listeners().contains(&format!("127.0.0.1:{port}")));
    p.signal(Signal::SIGKILL);
    // Not reaped yet: the proxy is a zombie, as under a busy dockerd.
    let gone = wait_until(Duration::from_secs(2), || {
        !stack.listeners().contains(&format!("127.0.0.1:{port}"))
    });
    assert!(gone, "listener still in Envoy 2 s after SIGKILL");
    assert!(stack.status().is_empty());
    drop(p);
}

#[test]
fn a_port_held_elsewhere_fails_like_docker_proxy() {
    let stack = Stack::start(Ads::Sotw);
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let be = backend::http("127.0.0.10", "never");
    let mut p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be));
    let status = p.status();
    assert!(status.starts_with("1\n"), "{status:?}");
    assert!(status.contains("Address already in use"), "{status:?}");
    assert_eq!(p.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(1));
    assert!(stack.status().is_empty(), "the registrar must forget it");
    // The registrar and Envoy carry on: the next mapping is served.
    let other = free_port();
    let _ok = stack.proxy(ProxySpec::tcp("127.0.0.1", other, be)).ready();
    assert_eq!(
        http_get(SocketAddr::from(([127, 0, 0, 1], other)), "/")
            .unwrap()
            .1,
        "never"
    );
}

fn registrar_restart_keeps_everything_served(ads: Ads) {
    let mut stack = Stack::start(ads);
    let modes = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let mut ports = Vec::new();
    let mut proxies = Vec::new();
    for ip in modes {
        let be = backend::http(ip, ip);
        let port = free_port();
        proxies.push(stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready());
        ports.push(port);
    }
    let before = stack.status();
    let watch = Watch::start(&stack, &ports);
    watch.wait_served(30);
    // Frozen proxies cannot register again by themselves, so what Envoy
    // sees after the restart comes from the registrar's own recovery.
    for p in &proxies {
        p.signal(Signal::SIGSTOP);
    }
    stack.kill_registrar();
    // Served while the registrar is gone.
    watch.wait_served(30);
    stack.start_registrar();
    assert_eq!(stack.status().len(), 3, "{}", stack.log());
    // Envoy reconnects within its backoff and must find every listener.
    assert!(
        wait_until(Duration::from_secs(10), || stack
            .log()
            .matches("stream 1 opened")
            .count()
            == 2),
        "Envoy did not reconnect: {}",
        stack.log()
    );
    watch.wait_served(30);
    for p in &proxies {
        p.signal(Signal::SIGCONT);
    }
    watch.wait_served(30);
    let (ok, failures) = watch.finish();
    assert!(failures.is_empty(), "{failures:#?}\n{}", stack.log());
    // Same state, same versions: the reconnected Envoy was sent nothing.
    let log = stack.log();
    let after_restart = log.rsplit("stream 1 opened").next().unwrap();
    for kind in ["CDS", "EDS", "LDS"] {
        assert!(
            !after_restart.contains(&format!(": {kind} version")),
            "{kind} pushed after the restart:\n{after_restart}"
        );
    }
    assert!(ok > 10, "only {ok} requests went through");
    let after = stack.status();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (&b["host"], &b["container"], &b["name"], &b["mode"]),
            (&a["host"], &a["container"], &a["name"], &a["mode"])
        );
    }
    // The proxies are still served and still stop cleanly.
    for mut p in proxies {
        p.signal(Signal::SIGINT);
        assert_eq!(p.wait_exit(Duration::from_secs(2)).unwrap().code(), Some(0));
    }
    assert!(stack.status().is_empty());
}

#[test]
fn registrar_sigkill_and_restart_drops_nothing_sotw() {
    registrar_restart_keeps_everything_served(Ads::Sotw);
}

#[test]
fn registrar_sigkill_and_restart_drops_nothing_delta() {
    registrar_restart_keeps_everything_served(Ads::Delta);
}

#[test]
fn resync_restores_mappings_after_a_restart_without_recovery() {
    let mut stack = Stack::start_with(Ads::Sotw, &["--no-recover"]);
    let mut proxies = Vec::new();
    for ip in ["127.0.0.14", "127.0.0.15"] {
        let be = backend::http(ip, ip);
        proxies.push(
            stack
                .proxy(ProxySpec::tcp("127.0.0.1", free_port(), be))
                .ready(),
        );
    }
    stack.kill_registrar();
    // Stopped proxies cannot register again by themselves: only resync can
    // bring their mappings back.
    for p in &proxies {
        p.signal(Signal::SIGSTOP);
    }
    stack.start_registrar();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stack.status().is_empty(),
        "--no-recover must not scan /proc"
    );
    let out = stack.run(&["resync"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &proxies {
        assert!(text.contains(&format!("(pid {})", p.pid())), "{text}");
    }
    let rows = stack.status();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut pids: Vec<u64> = rows
        .iter()
        .map(|r| r["owner_pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    let mut want: Vec<u64> = proxies.iter().map(|p| p.pid() as u64).collect();
    want.sort();
    assert_eq!(pids, want);
    for p in &proxies {
        p.signal(Signal::SIGCONT);
    }
    // A mapping replayed by resync dies with its process.
    let mut first = proxies.remove(0);
    first.signal(Signal::SIGKILL);
    let _ = first.child.wait();
    assert!(wait_until(Duration::from_secs(2), || stack.status().len() == 1));

    // With the registrar down, resync fails and says so.
    stack.kill_registrar();
    let out = stack.run(&["resync"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("registrar"));
}
