//! The Docker issue's scenarios against a real dockerd, with envoy-docker
//! as its userland proxy, a real registrar and a real Envoy. They share one
//! daemon and take turns (see `harness::dockerd`).

use crate::harness::dockerd::{self, Engine, Setup, IMAGE};
use crate::harness::watch::Watch;
use crate::harness::{admin_get, first_get, free_port, refused, wait_until};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

const BODY: &str = "hello from container\n";

/// One `#[test]` per setup for each scenario named: `NAME::legacy`,
/// `NAME::docker20` and `NAME::docker28`.
macro_rules! on_every_setup {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test]
            fn legacy() {
                super::super::$name(Setup::Legacy)
            }
            #[test]
            fn docker20() {
                super::super::$name(Setup::Firewalled(Engine::V20))
            }
            #[test]
            fn docker28() {
                super::super::$name(Setup::Firewalled(Engine::V28))
            }
        }
    )*};
}

mod on {
    use super::*;
    on_every_setup!(
        docker_1_ready_on_return_and_counted_under_the_container_name,
        docker_2_random_ports_are_served,
        docker_3_udp_echoes_through_the_relay,
        docker_4_dual_stack_proxies_each_get_a_listener,
        docker_5_stop_start_restart_and_remove,
        docker_6_labels_name_the_service_and_choose_the_mode,
        docker_7_a_port_held_outside_docker_fails_docker_run,
        docker_8_twenty_parallel_runs_are_named_and_served,
        docker_9_registrar_restart_keeps_serving_and_naming,
        docker_10_dockerd_restart_converges,
        docker_15_a_container_on_two_networks_is_found_and_served,
        docker_16_containers_started_while_the_registrar_is_down_are_served,
        docker_17_every_port_keeps_answering_when_envoy_is_killed,
    );
}

fn row_for(rows: &[serde_json::Value], host: &str) -> serde_json::Value {
    rows.iter()
        .find(|r| r["host"] == host)
        .cloned()
        .unwrap_or_else(|| panic!("no mapping for {host} in {rows:#?}"))
}

fn docker_1_ready_on_return_and_counted_under_the_container_name(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let h = free_port();
    env.run(&["-p", &format!("{h}:80"), "--name", "ready1", IMAGE]);
    // The very first request, right after `docker run` returned.
    let got = first_get(env.addr(h), "/").unwrap();
    assert_eq!(got, (200, BODY.to_string()));
    let prefix = format!("ready1_tcp_0-0-0-0_{h}");
    assert_eq!(
        env.stack.served(&prefix),
        1,
        "{}",
        admin_get(env.stack.admin, "/stats?filter=ready1")
    );
}

fn docker_2_random_ports_are_served(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let id = env.run(&["-P", IMAGE]);
    let addrs = env.published(&id, "80/tcp");
    assert!(!addrs.is_empty());
    for a in addrs {
        let got = first_get(a, "/").unwrap_or_else(|e| panic!("{a}: {e}"));
        assert_eq!(got, (200, BODY.to_string()), "{a}");
    }
}

fn docker_3_udp_echoes_through_the_relay(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let h = free_port();
    env.run(&[
        "-p",
        &format!("{h}:5353/udp"),
        IMAGE,
        "/bin/udp-echo",
        "5353",
    ]);
    let c = UdpSocket::bind("0.0.0.0:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 100];
    // The echo server may still be starting: retry a little.
    let ok = wait_until(Duration::from_secs(5), || {
        c.send_to(b"ping", env.addr(h)).unwrap();
        matches!(c.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"ping"
    });
    assert!(ok, "no UDP echo through the relay");
    let rows = env.stack.status();
    assert!(rows
        .iter()
        .any(|r| r["proto"] == "udp" && r["host"] == format!("0.0.0.0:{h}")));
}

fn docker_4_dual_stack_proxies_each_get_a_listener(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let h = free_port();
    env.run(&["-p", &format!("{h}:80"), IMAGE]);
    for addr in [env.addr(h), env.addr6(h)] {
        assert_eq!(
            first_get(addr, "/").unwrap(),
            (200, BODY.to_string()),
            "{addr}"
        );
    }
    let listeners = env.stack.listeners();
    assert!(
        listeners.contains(&format!("tcp_0-0-0-0_{h}::0.0.0.0:{h}")),
        "{listeners}"
    );
    assert!(
        listeners.contains(&format!("tcp_--_{h}::[::]:{h}")),
        "{listeners}"
    );
}

fn docker_5_stop_start_restart_and_remove(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let h = free_port();
    let id = env.run(&["-p", &format!("{h}:80"), "--name", "cycle", IMAGE]);
    let first_ip = env.ip_of(&id);
    assert_eq!(first_get(env.addr(h), "/").unwrap().0, 200);

    assert!(env.docker(&["stop", "-t", "1", &id]).status.success());
    assert!(refused(env.addr(h)), "port open after docker stop");
    assert!(!env.stack.listeners().contains(&format!(":{h}")));

    // Another container takes the freed address, so `cycle` gets a new one.
    env.run(&[IMAGE]);
    assert!(env.docker(&["start", &id]).status.success());
    env.wait_listening(&id);
    let second_ip = env.ip_of(&id);
    assert_ne!(first_ip, second_ip, "the test wanted a new address");
    assert_eq!(
        first_get(env.addr(h), "/").unwrap(),
        (200, BODY.to_string())
    );
    let row = row_for(&env.stack.status(), &format!("0.0.0.0:{h}"));
    assert_eq!(row["container"], format!("{second_ip}:80"));
    assert_eq!(row["name"], "cycle");

    assert!(env.docker(&["restart", "-t", "1", &id]).status.success());
    env.wait_listening(&id);
    assert_eq!(
        first_get(env.addr(h), "/").unwrap(),
        (200, BODY.to_string())
    );

    assert!(env.docker(&["rm", "-f", &id]).status.success());
    assert!(
        wait_until(Duration::from_secs(2), || refused(env.addr(h))),
        "port open after docker rm -f"
    );
    assert!(!env.stack.listeners().contains(&format!(":{h}")));
}

fn docker_6_labels_name_the_service_and_choose_the_mode(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let (web, api, plain) = (free_port(), free_port(), free_port());
    env.run(&[
        "-p",
        &format!("{web}:80"),
        "-l",
        "ServiceName=web",
        "-l",
        "EnvironmentName=prod",
        "-l",
        "ProxyMode=tcp",
        IMAGE,
    ]);
    env.run(&[
        "-p",
        &format!("{api}:80"),
        "-l",
        "com.docker.compose.service=api",
        IMAGE,
    ]);
    env.run(&["-p", &format!("{plain}:80"), "--name", "plain1", IMAGE]);
    for p in [web, api, plain] {
        assert_eq!(
            first_get(env.addr(p), "/").unwrap(),
            (200, BODY.to_string())
        );
    }
    let rows = env.stack.status();
    let row = row_for(&rows, &format!("0.0.0.0:{web}"));
    assert_eq!(
        (&row["name"], &row["mode"]),
        (&"web-prod".into(), &"tcp".into())
    );
    assert_eq!(row_for(&rows, &format!("0.0.0.0:{api}"))["name"], "api");
    let plain_row = row_for(&rows, &format!("0.0.0.0:{plain}"));
    assert_eq!(plain_row["name"], "plain1");
    assert_eq!(plain_row["container_name"], "plain1");
    assert_eq!(plain_row["container_id"].as_str().unwrap().len(), 64);

    let text = String::from_utf8_lossy(
        &std::process::Command::new(crate::harness::bin())
            .args(["status"])
            .env("ENVOY_DOCKER_SOCKET", &env.stack.socket)
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains("web-prod") && text.contains("plain1"),
        "{text}"
    );

    let prom = admin_get(env.stack.admin, "/stats/prometheus");
    for series in [
        format!("envoy_tcp_prefix=\"web-prod_tcp_0-0-0-0_{web}\""),
        format!("envoy_http_conn_manager_prefix=\"api_tcp_0-0-0-0_{api}\""),
        format!("envoy_http_conn_manager_prefix=\"plain1_tcp_0-0-0-0_{plain}\""),
        format!("envoy_cluster_name=\"web-prod_tcp_0-0-0-0_{web}\""),
    ] {
        assert!(
            prom.contains(&series),
            "no {series} in Envoy's Prometheus stats"
        );
    }
    // tcp mode really is tcp_proxy: no HTTP series for it.
    assert!(!prom.contains(&format!(
        "envoy_http_conn_manager_prefix=\"web-prod_tcp_0-0-0-0_{web}\""
    )));
}

fn docker_7_a_port_held_outside_docker_fails_docker_run(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let holder = env.within(|| TcpListener::bind("0.0.0.0:0").unwrap());
    let h = holder.local_addr().unwrap().port();
    let out = env.docker(&["run", "-d", "-p", &format!("{h}:80"), IMAGE]);
    assert!(
        !out.status.success(),
        "docker run succeeded on a taken port"
    );
    // 20.10: the proxy's bind error, which it reports on fd 3; 28: the
    // daemon binds the socket itself before it starts the proxy.
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("address already in use"), "{err}");
    assert!(
        wait_until(Duration::from_secs(2), || !env
            .stack
            .status()
            .iter()
            .any(|r| r["host"].as_str().unwrap().ends_with(&format!(":{h}")))),
        "the registrar kept the failed mapping"
    );
}

fn docker_8_twenty_parallel_runs_are_named_and_served(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
    let sock = env.sock.clone();
    let threads: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (sock, p) = (sock.clone(), *p);
            std::thread::spawn(move || {
                std::process::Command::new("docker")
                    .arg("-H")
                    .arg(format!("unix://{}", sock.display()))
                    .args(["run", "-d", "-p", &format!("{p}:80")])
                    .args(["-l", &format!("ServiceName=svc{i}"), IMAGE])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for t in threads {
        let out = t.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows = env.stack.status();
    for (i, p) in ports.iter().enumerate() {
        assert_eq!(
            first_get(env.addr(*p), "/").unwrap(),
            (200, BODY.to_string()),
            "port {p}"
        );
        let row = row_for(&rows, &format!("0.0.0.0:{p}"));
        assert_eq!(row["name"], format!("svc{i}"));
        assert_eq!(row["state"], "active");
    }
}

fn docker_9_registrar_restart_keeps_serving_and_naming(setup: Setup) {
    let mut env = dockerd::shared_on(setup);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    env.run(&[
        "-p",
        &format!("{}:80", ports[0]),
        "-l",
        "ServiceName=alpha",
        IMAGE,
    ]);
    env.run(&[
        "-p",
        &format!("{}:80", ports[1]),
        "-l",
        "ServiceName=beta",
        "-l",
        "ProxyMode=tcp",
        IMAGE,
    ]);
    env.run(&["-p", &format!("{}:80", ports[2]), "--name", "gamma", IMAGE]);
    let before = env.stack.status();
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| env.addr(*p)).collect();
    let watch = Watch::start_at(&env.stack, &addrs);
    watch.wait_served(30);
    env.stack.kill_registrar();
    // Served while the registrar is gone, and after it is back.
    watch.wait_served(30);
    env.stack.start_registrar();
    watch.wait_served(60);
    let (ok, failures) = watch.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(ok > 10);
    // The restarted registrar names each mapping again, from Docker's
    // answer to the proxy's registration or from its own container list,
    // whichever comes first: wait for the names to come back.
    let named = |after: &[serde_json::Value]| {
        before.iter().all(|b| {
            after
                .iter()
                .any(|a| a["host"] == b["host"] && a["name"] == b["name"])
        })
    };
    wait_until(Duration::from_secs(20), || named(&env.stack.status()));
    let after = env.stack.status();
    assert_eq!(before.len(), after.len());
    for b in &before {
        let a = row_for(&after, b["host"].as_str().unwrap());
        assert_eq!((&a["name"], &a["mode"]), (&b["name"], &b["mode"]), "{a}");
    }
}

fn docker_10_dockerd_restart_converges(setup: Setup) {
    let mut env = dockerd::shared_on(setup);
    let (a, b) = (free_port(), free_port());
    env.run(&[
        "--restart",
        "always",
        "-p",
        &format!("{a}:80"),
        "--name",
        "keep-a",
        IMAGE,
    ]);
    env.run(&[
        "--restart",
        "always",
        "-p",
        &format!("{b}:80"),
        "--name",
        "keep-b",
        IMAGE,
    ]);
    env.stop_dockerd();
    assert!(
        wait_until(Duration::from_secs(5), || refused(env.addr(a))
            && refused(env.addr(b))),
        "ports still open with dockerd stopped"
    );
    env.start_dockerd();
    let served = wait_until(Duration::from_secs(30), || {
        [a, b]
            .iter()
            .all(|p| matches!(first_get(env.addr(*p), "/"), Ok((200, _))))
    });
    assert!(served, "containers not served after dockerd restart");
    // Names come from Docker, whose watcher reconnects on its own schedule
    // after the restart: wait for them to converge.
    wait_until(Duration::from_secs(15), || {
        env.stack
            .status()
            .iter()
            .filter(|r| r["proto"] == "tcp")
            .all(|r| ["keep-a", "keep-b"].contains(&r["name"].as_str().unwrap_or("")))
    });
    // Exactly the live mappings: two ports, two families each, nothing stale.
    let rows = env.stack.status();
    let tcp: Vec<_> = rows.iter().filter(|r| r["proto"] == "tcp").collect();
    assert_eq!(tcp.len(), 4, "{rows:#?}");
    let listeners = env.stack.listeners();
    assert_eq!(listeners.lines().count(), 4, "{listeners}");
    for r in tcp {
        assert!(
            ["keep-a", "keep-b"].contains(&r["name"].as_str().unwrap()),
            "{r}"
        );
    }
}

fn docker_15_a_container_on_two_networks_is_found_and_served(setup: Setup) {
    let env = dockerd::shared_on(setup);
    let net = "edtest-net";
    let _ = env.docker(&["network", "rm", net]);
    let out = env.docker(&["network", "create", "--subnet", "172.29.8.0/24", net]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = free_port();
    let id = env.run(&[
        "--network",
        net,
        "-p",
        &format!("{h}:80"),
        "--name",
        "two-nets",
        "-l",
        "ServiceName=multi",
        IMAGE,
    ]);
    assert!(env
        .docker(&["network", "connect", "bridge", &id])
        .status
        .success());
    assert_eq!(
        first_get(env.addr(h), "/").unwrap(),
        (200, BODY.to_string())
    );
    // dockerd publishes the port on one of the two networks (it moves the
    // mapping when the default bridge is connected); either address is this
    // container's, and the mapping is named after it.
    let row = row_for(&env.stack.status(), &format!("0.0.0.0:{h}"));
    let out = env.docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        &id,
    ]);
    let ips = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(ips.split_whitespace().count(), 2, "{ips}");
    let backend = row["container"].as_str().unwrap().trim_end_matches(":80");
    assert!(
        ips.split_whitespace().any(|ip| ip == backend),
        "{row} vs {ips}"
    );
    assert_eq!(row["name"], "multi");
    assert_eq!(row["container_name"], "two-nets");
    // A restart puts it back on both networks, with new proxies.
    assert!(env.docker(&["restart", "-t", "1", &id]).status.success());
    env.wait_listening(&id);
    assert_eq!(
        first_get(env.addr(h), "/").unwrap(),
        (200, BODY.to_string())
    );
    assert_eq!(
        row_for(&env.stack.status(), &format!("0.0.0.0:{h}"))["name"],
        "multi"
    );
    assert!(env.docker(&["rm", "-f", &id]).status.success());
    assert!(env.docker(&["network", "rm", net]).status.success());
}

fn docker_16_containers_started_while_the_registrar_is_down_are_served(setup: Setup) {
    let mut env = dockerd::shared_on(setup);
    env.stack.kill_registrar();
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    for (i, p) in ports.iter().enumerate() {
        // `docker run` succeeds: the proxy relays without the registrar.
        env.run(&[
            "-p",
            &format!("{p}:80"),
            "--name",
            &format!("noreg{i}"),
            IMAGE,
        ]);
    }
    for p in &ports {
        assert_eq!(
            first_get(env.addr(*p), "/").unwrap(),
            (200, BODY.to_string())
        );
    }
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| env.addr(*p)).collect();
    let watch = Watch::start_requests_at(&addrs);
    env.stack.start_registrar();
    // The proxies register again, and Envoy takes their ports over.
    assert!(
        env.stack
            .wait_served_by(&ports, "envoy", Duration::from_secs(20)),
        "{}",
        dockerd::tail(&env.stack.log(), 30)
    );
    let (ok, failures) = watch.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(ok > 10);
    let rows = env.stack.status();
    for (i, p) in ports.iter().enumerate() {
        let row = row_for(&rows, &format!("0.0.0.0:{p}"));
        assert_eq!(row["container_name"], format!("noreg{i}"), "{row}");
    }
}

fn docker_17_every_port_keeps_answering_when_envoy_is_killed(setup: Setup) {
    let mut env = dockerd::shared_on(setup);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for p in &ports {
        env.run(&["-p", &format!("{p}:80"), IMAGE]);
    }
    assert!(env
        .stack
        .wait_served_by(&ports, "envoy", Duration::from_secs(5)));
    env.stack.kill_envoy();
    // Taken back by the proxies: served without any Envoy.
    assert!(env
        .stack
        .wait_served_by(&ports, "relay", Duration::from_secs(5)));
    for p in &ports {
        assert_eq!(
            first_get(env.addr(*p), "/").unwrap(),
            (200, BODY.to_string())
        );
    }
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| env.addr(*p)).collect();
    let watch = Watch::start_requests_at(&addrs);
    env.stack.start_envoy(crate::harness::Ads::Sotw);
    assert!(env
        .stack
        .wait_served_by(&ports, "envoy", Duration::from_secs(10)));
    watch.wait_served(30);
    let (ok, failures) = watch.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(ok > 10);
}

#[test]
fn docker_18_docker_run_succeeds_under_rogue_xds_streams_and_a_descriptor_flood() {
    use crate::harness::peer::{self, assert_not_spinning, idle_flood, Rogue};
    let env = dockerd::shared();
    let before = free_port();
    env.run(&[
        "-p",
        &format!("{before}:80"),
        "--name",
        "before-attack",
        IMAGE,
    ]);
    let mut attackers = vec![
        peer::rogue_ads(env.stack.xds, Rogue::Silent),
        peer::rogue_ads(env.stack.xds, Rogue::Nack),
        idle_flood(env.stack.registrar_admin, 70, 30),
        idle_flood(env.stack.xds, 70, 30),
    ];
    std::thread::sleep(Duration::from_secs(1));
    let h = free_port();
    env.run(&["-p", &format!("{h}:80"), "--name", "under-attack", IMAGE]);
    for p in [before, h] {
        assert_eq!(
            first_get(env.addr(p), "/").unwrap(),
            (200, BODY.to_string())
        );
    }
    let rows = env.stack.status();
    for name in ["before-attack", "under-attack"] {
        assert!(
            rows.iter().any(|r| r["container_name"] == name),
            "{name} not listed: {rows:#?}"
        );
    }
    assert_not_spinning(env.stack.registrar_pid());
    for mut a in attackers.drain(..) {
        let _ = a.kill();
        let _ = a.wait();
    }
}
