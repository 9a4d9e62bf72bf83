//! The proxy owns the port and lends it to Envoy: Docker 28/29's pre-bound
//! socket (simulated as moby does it; see `harness::proc`), hand-over and
//! take-back under a connect loop, and a registrar or Envoy that is down,
//! restarting or hung.

use crate::harness::load::{failure_window, failures_between, ConnectLoop};
use crate::harness::{
    backend, free_port, http_get, listens_on, wait_until, Ads, Proxy, ProxySpec, Stack,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn v6(port: u16) -> SocketAddr {
    format!("[::1]:{port}").parse().unwrap()
}

/// Requests Envoy served for the mapping on `host` (see `Stack::served`).
fn rq_2xx(stack: &Stack, host: &str, port: u16) -> u64 {
    let rows = stack.status();
    let row = rows
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no mapping for {host}: {rows:?}"));
    let listener = row["name"].as_str().unwrap().to_string();
    let ip = if host.starts_with('[') {
        "--"
    } else {
        "0-0-0-0"
    };
    stack.served(&format!("{listener}_tcp_{ip}_{port}"))
}

#[test]
fn docker_28_and_29_tcp_on_both_families_is_handed_to_envoy_alone() {
    let stack = Stack::start(Ads::Delta);
    let be = backend::http("127.0.0.20", "through envoy");
    let port = free_port();
    // IPv4 as Docker 28 starts it; IPv6 as Docker 29.5 does, through nsenter.
    let p4 = stack.proxy(ProxySpec::tcp("0.0.0.0", port, be).docker(28, false));
    let p6 = stack.proxy(ProxySpec::tcp("::", port, be).docker(29, true));
    let (p4, p6) = (p4.ready(), p6.ready());
    for p in [&p4, &p6] {
        p.parent_copy_closed
            .recv_timeout(Duration::from_secs(1))
            .expect("dockerd's copy is closed once it has read 0\\n");
    }
    // The first request right after ready goes through Envoy and counts.
    for (addr, host) in [
        (v4(port), format!("0.0.0.0:{port}")),
        (v6(port), format!("[::]:{port}")),
    ] {
        assert_eq!(http_get(addr, "/").unwrap(), (200, "through envoy".into()));
        assert_eq!(rq_2xx(&stack, &host, port), 1, "{host}");
    }
    // With dockerd's copy closed, no proxy holds a listening socket: Envoy
    // alone serves, and counts every request.
    for p in [&p4, &p6] {
        assert!(
            !listens_on(p.pid(), port),
            "proxy {} still listens",
            p.pid()
        );
    }
    for _ in 0..20 {
        assert_eq!(http_get(v4(port), "/").unwrap().0, 200);
        assert_eq!(http_get(v6(port), "/").unwrap().0, 200);
    }
    assert_eq!(rq_2xx(&stack, &format!("0.0.0.0:{port}"), port), 21);
    assert_eq!(rq_2xx(&stack, &format!("[::]:{port}"), port), 21);
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(2)));
}

#[test]
fn docker_28_and_29_udp_sockets_echo_for_two_clients() {
    let stack = Stack::start(Ads::Sotw);
    let echo = backend::udp_echo("127.0.0.21");
    for version in [28, 29] {
        let port = free_port();
        let spec = ProxySpec::mapping("udp", "127.0.0.1", port, "127.0.0.21", echo.port())
            .docker(version, version == 29);
        let p = stack.proxy(spec).ready();
        let clients: Vec<UdpSocket> = (0..2)
            .map(|_| {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                c
            })
            .collect();
        for round in 0..5 {
            for (i, c) in clients.iter().enumerate() {
                let msg = format!("v{version} client {i} round {round}");
                c.send_to(msg.as_bytes(), v4(port)).unwrap();
                let mut buf = [0u8; 128];
                let (n, _) = c.recv_from(&mut buf).expect("no echo");
                assert_eq!(&buf[..n], msg.as_bytes());
            }
        }
        drop(p);
    }
}

/// Relay, hand-over to a new Envoy, take-back after Envoy's SIGKILL, and a
/// second hand-over to the restarted Envoy, all under one connect loop.
fn handover_and_takeback_under_a_connect_loop(ads: Ads, docker: Option<u32>) {
    let mut stack = Stack::registrar_only(&[]);
    let be = backend::http("127.0.0.22", "always answered");
    let port = free_port();
    let mut spec = ProxySpec::tcp("127.0.0.1", port, be);
    if let Some(v) = docker {
        spec = spec.docker(v, false);
    }
    // No Envoy yet: the registrar tells the proxy to relay at once.
    let proxy = stack.proxy(spec).ready();
    assert!(stack.wait_served_by(&[port], "relay", Duration::from_secs(2)));
    let load = ConnectLoop::start(v4(port), "always answered");
    load.run_for(300, Duration::from_secs(20));

    // 1. Hand-over to a fresh Envoy.
    let t0 = Instant::now();
    stack.start_envoy(ads);
    assert!(
        stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)),
        "{}",
        stack.log()
    );
    assert!(!listens_on(proxy.pid(), port));
    load.run_for(300, Duration::from_secs(20));

    // 2. Envoy dies: the proxy takes the port back.
    let killed = Instant::now();
    stack.kill_envoy();
    assert!(stack.wait_served_by(&[port], "relay", Duration::from_secs(5)));
    assert!(load.wait_for_success_after(Instant::now(), Duration::from_secs(5)));
    load.run_for(300, Duration::from_secs(20));

    // 3. Envoy is back: the second hand-over.
    let t2 = Instant::now();
    stack.start_envoy(ads);
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)));
    load.run_for(
        2000usize.saturating_sub(load.count()).max(300),
        Duration::from_secs(30),
    );
    let end = Instant::now();
    let log = load.finish();

    assert!(log.len() >= 2000, "only {} connections", log.len());
    let before = failures_between(&log, log[0].at, killed);
    assert!(
        before.is_empty(),
        "failed before the kill (hand-over began {:?} after the start): {before:?}",
        t0.duration_since(log[0].at)
    );
    let after = failures_between(&log, t2, end);
    assert!(
        after.is_empty(),
        "failed in the second hand-over: {after:?}"
    );
    let window = failure_window(&log, killed, t2);
    eprintln!(
        "{ads:?} docker {docker:?}: {} connections; hand-over at {:?}; failure window after the Envoy kill: {window:?}",
        log.len(),
        t0.duration_since(log[0].at)
    );
    // Served by the relay again long before the restarted Envoy: the
    // window is closed by the take-back, not by Envoy's return.
    assert!(window < t2.duration_since(killed), "{window:?}");

    let metrics = crate::harness::admin_get(stack.registrar_admin, "/metrics");
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(counter("envoy_docker_handovers_total") >= 2);
    assert!(counter("envoy_docker_takebacks_total") >= 1);
    assert!(counter("envoy_docker_relayed_connections_total") >= 300);
}

#[test]
fn handover_and_takeback_under_load_docker_28_delta() {
    handover_and_takeback_under_a_connect_loop(Ads::Delta, Some(28));
}

#[test]
fn handover_and_takeback_under_load_docker_20_sotw() {
    handover_and_takeback_under_a_connect_loop(Ads::Sotw, None);
}

#[test]
fn registrar_down_at_start_then_envoy_takes_over_with_nothing_failed() {
    let mut stack = Stack::start(Ads::Delta);
    stack.kill_registrar();
    let be = backend::http("127.0.0.23", "registrar optional");
    let port = free_port();
    let started = Instant::now();
    let proxy = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be).docker(28, false));
    let proxy = proxy.ready();
    let took = started.elapsed();
    eprintln!("ready {took:?} after spawn with the registrar down");
    // A ceiling that only a proxy waiting on the dead registrar misses
    // (dockerd waits 16 s); the figure is the benchmarks'.
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(listens_on(proxy.pid(), port));
    let load = ConnectLoop::start(v4(port), "registrar optional");
    load.run_for(200, Duration::from_secs(20));
    stack.start_registrar();
    // Envoy reconnects on its own back-off; then it takes the port over.
    assert!(
        stack.wait_served_by(&[port], "envoy", Duration::from_secs(20)),
        "{}",
        stack.log()
    );
    assert!(!listens_on(proxy.pid(), port));
    load.run_for(200, Duration::from_secs(20));
    let log = load.finish();
    let failed: Vec<_> = log.iter().filter_map(|o| o.error.clone()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}

#[test]
fn a_hung_registrar_does_not_hold_up_a_new_proxy() {
    let stack = Stack::start(Ads::Sotw);
    let pid = Pid::from_raw(stack.registrar_pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let be = backend::http("127.0.0.24", "despite a hung registrar");
    let port = free_port();
    let started = Instant::now();
    let p: Proxy = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be));
    let status = p.status();
    let took = started.elapsed();
    eprintln!("ready {took:?} after spawn with the registrar stopped");
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(status, "0\n");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(
        http_get(v4(port), "/").unwrap(),
        (200, "despite a hung registrar".into())
    );
    // Once the registrar runs again, Envoy takes the port over.
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(2), || !listens_on(
        p.pid(),
        port
    )));
    assert_eq!(http_get(v4(port), "/").unwrap().0, 200);
}

/// Timeslices the process has run so far, over all its threads: each
/// wake-up of a thread is at least one (`/proc/PID/task/TID/schedstat`,
/// third field).
fn timeslices(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// The process's resident pages that are backed by files (its code and
/// read-only data, mostly), in kB.
fn rss_file_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssFile in /proc/PID/status")
}

#[test]
fn a_settled_proxy_sleeps_and_gives_back_its_code_pages() {
    let mut stack = Stack::start(Ads::Delta);
    let be = backend::http("127.0.0.25", "settled");
    let port = free_port();
    let p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be).docker(28, false));
    let p = p.ready();
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)));
    let pid = p.pid();
    // Once left alone, the proxy drops its resident code pages (they stay
    // in the page cache): without that they would stay mapped for good.
    let at_ready = rss_file_kb(pid);
    assert!(
        wait_until(Duration::from_secs(10), || rss_file_kb(pid) * 2 < at_ready),
        "file-backed RSS stayed at {} kB (was {at_ready} kB at hand-over)",
        rss_file_kb(pid)
    );
    // Settled and handed over, it has no timer: over an observation window
    // (a span of nothing happening has no event to wait on) it never runs.
    let before = timeslices(pid);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(timeslices(pid), before, "an idle proxy woke up");
    // The pages it gave back come back when needed: with Envoy gone, the
    // proxy takes the port back and relays.
    stack.kill_envoy();
    assert!(
        stack.wait_served_by(&[port], "relay", Duration::from_secs(10)),
        "{}",
        stack.log()
    );
    assert!(wait_until(Duration::from_secs(5), || listens_on(pid, port)));
    assert_eq!(http_get(v4(port), "/").unwrap(), (200, "settled".into()));
}
