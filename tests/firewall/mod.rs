//! Docker's own networking kept (issue 18): Debian's dockerd 20.10 and
//! Debian unstable's 28.x with their firewall on (iptables, the default),
//! each in a network namespace of its own, with the test process as the
//! outside host on a veth (see `harness::dockerd`). The registrar claims
//! the published ports in that namespace's nftables, ahead of Docker's
//! DNAT; these tests check that published traffic still reaches the
//! proxies and Envoy, and that Docker's NAT and isolation still hold.
//!
//! Whether a connection came through envoy-docker is told by the backend:
//! the test image's `whoami` answers with its client's address, which is
//! the bridge gateway when the proxy or Envoy connected to it, and the
//! outside client's own address when Docker's DNAT delivered it.
//!
//! `docker29` simulates Docker 29's nftables firewall, which no engine here
//! can run.

mod docker29;

use crate::harness::dockerd::{self, DockerEnv, Engine, Setup, GATEWAY, IMAGE};
use crate::harness::load::{failure_window, ConnectLoop};
use crate::harness::{free_port, http_get, wait_until, Ads};
use envoy_docker::mapping::{MappingKey, Proto};
use envoy_docker::nft::ruleset::{parse_listing, Listing};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

const BODY: &str = "hello from container\n";

/// One `#[test]` per engine for each scenario: `NAME::docker20` and
/// `NAME::docker28`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn docker20() {
                super::super::$name(super::super::Engine::V20)
            }
            #[test]
            fn docker28() {
                super::super::$name(super::super::Engine::V28)
            }
        }
    )*};
}

mod on {
    on_both_engines!(
        fw_1_outside_clients_reach_envoy_over_ipv4_ipv6_udp_and_a_host_address,
        fw_2_containers_keep_outbound_nat_and_network_isolation,
        fw_3_a_container_reaches_a_published_port_by_the_gateway_and_the_host_address,
        fw_4_registrar_and_envoy_killed_together_the_proxies_take_the_ports_back,
        fw_5_no_claim_outlives_its_mapping,
    );
}

fn env_for(engine: Engine) -> std::sync::MutexGuard<'static, DockerEnv> {
    dockerd::shared_on(Setup::Firewalled(engine))
}

/// `docker run -d` of the `whoami` server on container port `port`.
fn whoami(env: &DockerEnv, publish: &str, proto: &str, port: u16, name: &str) -> String {
    env.run(&[
        "-p",
        publish,
        "--name",
        name,
        IMAGE,
        "/bin/whoami",
        proto,
        &port.to_string(),
    ])
}

/// The address `whoami` saw, over HTTP; waits for the server to start.
fn who_sees(addr: SocketAddr) -> String {
    let mut seen = None;
    let up = wait_until(Duration::from_secs(10), || match http_get(addr, "/") {
        Ok((200, body)) => {
            seen = Some(body);
            true
        }
        _ => false,
    });
    assert!(up, "no answer from whoami at {addr}");
    seen.unwrap()
}

/// The address `whoami` saw, over UDP.
fn who_sees_udp(addr: SocketAddr) -> String {
    let c = UdpSocket::bind("0.0.0.0:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 100];
    let mut seen = None;
    let ok = wait_until(Duration::from_secs(10), || {
        c.send_to(b"who", addr).unwrap();
        match c.recv_from(&mut buf) {
            Ok((n, _)) => {
                seen = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                true
            }
            Err(_) => false,
        }
    });
    assert!(ok, "no UDP answer from whoami at {addr}");
    seen.unwrap()
}

/// The table as `nft -j list` shows it in the Docker host's namespace.
fn table(env: &DockerEnv) -> Option<Listing> {
    let out = env
        .command("nft")
        .args(["-j", "list", "table", "inet", "envoy-docker"])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(parse_listing(&doc).unwrap())
}

/// Waits (bounded) until the table claims the binding.
fn wait_claimed(env: &DockerEnv, proto: Proto, ip: &str, port: u16) -> bool {
    wait_until(Duration::from_secs(5), || claimed(env, proto, ip, port))
}

fn claimed(env: &DockerEnv, proto: Proto, ip: &str, port: u16) -> bool {
    let key = MappingKey {
        proto,
        host_ip: ip.parse().unwrap(),
        host_port: port,
    };
    table(env).is_some_and(|t| t.intact && t.claims.contains(&key))
}

/// Text of the whole ruleset that names `port`, for failure messages and
/// for "nothing names it".
fn rules_naming(env: &DockerEnv, port: u16) -> Vec<String> {
    let out = env
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let table = table(env);
    let mut named: Vec<String> = table
        .into_iter()
        .flat_map(|t| t.claims)
        .filter(|k| k.host_port == port)
        .map(|k| format!("element {k}"))
        .collect();
    // Docker's own DNAT rules name the port too while it is published;
    // ours are elements only: the chains never name a port.
    named.extend(
        text.lines()
            .skip_while(|l| !l.starts_with("table inet envoy-docker"))
            .take_while(|l| *l != "}")
            .filter(|l| l.contains(&format!("dport {port}")))
            .map(str::to_string),
    );
    named
}

fn fw_1_outside_clients_reach_envoy_over_ipv4_ipv6_udp_and_a_host_address(engine: Engine) {
    let env = env_for(engine);
    let ns = env.netns.clone().unwrap();
    let (h, at, u) = (free_port(), free_port(), free_port());
    whoami(&env, &format!("{h}:8000"), "tcp", 8000, "who-any");
    whoami(
        &env,
        &format!("{}:{at}:8000", ns.host_ip()),
        "tcp",
        8000,
        "who-at",
    );
    whoami(&env, &format!("{u}:8001/udp"), "udp", 8001, "who-udp");
    assert!(wait_claimed(&env, Proto::Tcp, "0.0.0.0", h));
    assert!(wait_claimed(&env, Proto::Tcp, "::", h));
    assert!(wait_claimed(
        &env,
        Proto::Tcp,
        &ns.host_ip().to_string(),
        at
    ));
    assert!(wait_claimed(&env, Proto::Udp, "0.0.0.0", u));

    // IPv4, IPv6 and a specific host address, from outside: the backend
    // sees the gateway (the proxy or Envoy connected to it), and Envoy
    // counts every one.
    for (addr, listener) in [
        (env.addr(h), format!("tcp_0-0-0-0_{h}")),
        (env.addr6(h), format!("tcp_--_{h}")),
        (
            env.addr(at),
            format!("tcp_{}_{at}", ns.host_ip().to_string().replace('.', "-")),
        ),
    ] {
        let prefix = if addr.port() == h {
            format!("who-any_{listener}")
        } else {
            format!("who-at_{listener}")
        };
        let before = env.stack.served(&prefix);
        assert_eq!(who_sees(addr), GATEWAY, "{addr}");
        assert!(
            env.stack.served(&prefix) > before,
            "Envoy did not count {addr} under {prefix}"
        );
    }
    // UDP through the relay: the proxy's own socket sends from the gateway.
    assert_eq!(who_sees_udp(env.addr(u)), GATEWAY);
    // And Docker's DNAT really is there, in front of what we claim: the
    // host's nat table sends the port to the container.
    let nat = String::from_utf8_lossy(
        &env.command("iptables")
            .args(["-t", "nat", "-S"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        nat.contains(&format!("--dport {h} -j DNAT")),
        "no Docker DNAT for {h}:\n{nat}"
    );
    // And the registrar says the ports are claimed.
    let text = String::from_utf8_lossy(&env.stack.run(&["status"]).stdout).into_owned();
    assert!(
        text.contains("Published ports: claimed in nftables"),
        "{text}"
    );
    let (_, health) = http_get(env.stack.registrar_admin, "/healthz").unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["ports"]["claimed"], true, "{health}");
}

/// One connection accepted on `listener`, in a thread: the peer's address.
fn accept_one(listener: TcpListener) -> std::thread::JoinHandle<Option<IpAddr>> {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        let (mut c, peer) = listener.accept().ok()?;
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nout");
        Some(peer.ip())
    })
}

/// A GET from a new container (on `network`, else the default bridge):
/// the body, or why it failed. Bounded: busybox's `timeout` kills wget,
/// which runs as a child of `sh` (PID 1 of a container ignores signals).
/// Debian's busybox wget crashes on its own `-T`, so it is not used.
fn container_get(env: &DockerEnv, network: Option<&str>, url: &str) -> Result<String, String> {
    let script = format!("timeout -s KILL 5 wget -q -O - {url}; echo \"rc=$?\"");
    let mut args = vec!["run", "--rm"];
    if let Some(n) = network {
        args.extend(["--network", n]);
    }
    args.extend([IMAGE, "sh", "-c", &script]);
    let out = env.docker(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.strip_suffix("rc=0\n") {
        Some(body) if out.status.success() => Ok(body.to_string()),
        _ => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

fn fw_2_containers_keep_outbound_nat_and_network_isolation(engine: Engine) {
    let env = env_for(engine);
    let ns = env.netns.clone().unwrap();
    // A server on the outside host; a container reaches it, seen with the
    // Docker host's address (Docker's MASQUERADE).
    let server = TcpListener::bind((ns.outside_ip(), 0)).unwrap();
    let url = format!("http://{}/", server.local_addr().unwrap());
    let seen = accept_one(server);
    let out = container_get(&env, None, &url);
    assert_eq!(out.as_deref(), Ok("out"), "a container cannot get out");
    assert_eq!(seen.join().unwrap(), Some(IpAddr::V4(ns.host_ip())));

    // Two user networks: a container on n1 cannot reach one on n2, while
    // one on n2 can.
    let nets = [("edfw-n1", "172.29.21.0/24"), ("edfw-n2", "172.29.22.0/24")];
    for (name, subnet) in nets {
        let _ = env.docker(&["network", "rm", name]);
        let out = env.docker(&["network", "create", "--subnet", subnet, name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let web = env.run(&["--network", "edfw-n2", IMAGE]);
    let url = format!("http://{}/", env.ip_of(&web));
    let same = container_get(&env, Some("edfw-n2"), &url);
    assert_eq!(same.as_deref(), Ok(BODY), "n2 to n2");
    let across = container_get(&env, Some("edfw-n1"), &url);
    assert!(across.is_err(), "n1 reached n2: {across:?}");
    env.remove_all_containers();
    for (name, _) in nets {
        assert!(env.docker(&["network", "rm", name]).status.success());
    }
}

fn fw_3_a_container_reaches_a_published_port_by_the_gateway_and_the_host_address(engine: Engine) {
    let env = env_for(engine);
    let ns = env.netns.clone().unwrap();
    let h = free_port();
    whoami(&env, &format!("{h}:8000"), "tcp", 8000, "who-hair");
    let prefix = format!("who-hair_tcp_0-0-0-0_{h}");
    assert_eq!(who_sees(env.addr(h)), GATEWAY);
    for host in [GATEWAY.to_string(), ns.host_ip().to_string()] {
        let before = env.stack.served(&prefix);
        let url = format!("http://{host}:{h}/");
        let got = container_get(&env, None, &url);
        assert_eq!(got.as_deref(), Ok(GATEWAY), "{url}");
        assert!(
            env.stack.served(&prefix) > before,
            "Envoy did not serve {url}"
        );
    }
}

fn fw_4_registrar_and_envoy_killed_together_the_proxies_take_the_ports_back(engine: Engine) {
    let mut env = env_for(engine);
    let ports = [free_port(), free_port()];
    for p in ports {
        env.run(&["-p", &format!("{p}:80"), IMAGE]);
    }
    assert!(env
        .stack
        .wait_served_by(&ports, "envoy", Duration::from_secs(10)));
    let watch = ConnectLoop::start(env.addr(ports[0]), BODY);
    watch.run_for(20, Duration::from_secs(10));
    let killed = Instant::now();
    env.stack.kill_registrar();
    env.stack.kill_envoy();
    // Nobody listens; the claimed port refuses until its proxy notices.
    assert!(
        watch.wait_for_success_after(killed, Duration::from_secs(10)),
        "the port did not answer again with the registrar and Envoy gone"
    );
    let back = Instant::now();
    watch.run_for(20, Duration::from_secs(10));
    // Both ports, while the control plane is gone; each proxy asks the
    // kernel on its own, so the second may come back a moment later.
    for p in ports {
        assert!(
            wait_until(Duration::from_secs(10), || matches!(
                http_get(env.addr(p), "/"),
                Ok((200, b)) if b == BODY
            )),
            "port {p} did not answer again"
        );
    }
    let restarted = Instant::now();
    env.stack.start_registrar();
    env.stack.start_envoy(Ads::Sotw);
    assert!(
        env.stack
            .wait_served_by(&ports, "envoy", Duration::from_secs(20)),
        "Envoy does not serve the ports again:\n{}",
        dockerd::tail(&env.stack.log(), 30)
    );
    watch.run_for(20, Duration::from_secs(10));
    let log = watch.finish();
    let outage = failure_window(&log, killed, back);
    println!(
        "Docker {engine:?}: registrar and Envoy killed; the port answered again after {:?} \
         (failures for {outage:?})",
        back - killed
    );
    // After the restart, nothing failed, and Envoy served the requests.
    let after: Vec<_> = log
        .iter()
        .filter(|o| o.at > restarted && o.error.is_some())
        .collect();
    assert!(after.is_empty(), "{after:?}");
    // The restarted Envoy's counters start at zero.
    let prefix = format!("{}_tcp_0-0-0-0_{}", name_of(&env, ports[0]), ports[0]);
    assert!(
        env.stack.served(&prefix) > 0,
        "the restarted Envoy served nothing under {prefix}"
    );
}

/// The name the registrar gave the mapping on `port`.
fn name_of(env: &DockerEnv, port: u16) -> String {
    env.stack
        .status()
        .iter()
        .find(|r| r["host"] == format!("0.0.0.0:{port}"))
        .and_then(|r| r["name"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn fw_5_no_claim_outlives_its_mapping(engine: Engine) {
    let mut env = env_for(engine);
    // docker rm -f: the claims go with the mapping.
    let h = free_port();
    let id = env.run(&["-p", &format!("{h}:80"), IMAGE]);
    assert!(wait_claimed(&env, Proto::Tcp, "0.0.0.0", h));
    assert!(wait_claimed(&env, Proto::Tcp, "::", h));
    assert!(env.docker(&["rm", "-f", &id]).status.success());
    assert!(
        wait_until(Duration::from_secs(5), || rules_naming(&env, h).is_empty()),
        "{:?}",
        rules_naming(&env, h)
    );

    // A SIGKILLed proxy: its claim goes, and Docker's DNAT serves the port.
    let k = free_port();
    env.run(&["-p", &format!("{k}:80"), IMAGE]);
    assert!(wait_claimed(&env, Proto::Tcp, "0.0.0.0", k));
    let pid = owner_of(&env, &format!("0.0.0.0:{k}"));
    kill9(pid);
    assert!(
        wait_until(Duration::from_secs(5), || !claimed(
            &env,
            Proto::Tcp,
            "0.0.0.0",
            k
        )),
        "the dead proxy's claim stayed"
    );
    assert!(
        claimed(&env, Proto::Tcp, "::", k),
        "the live one's went too"
    );
    assert_eq!(http_get(env.addr(k), "/").unwrap(), (200, BODY.to_string()));

    // A proxy that dies while no registrar runs: its claim is swept when
    // the registrar starts again.
    let m = free_port();
    env.run(&["-p", &format!("{m}:80"), IMAGE]);
    assert!(wait_claimed(&env, Proto::Tcp, "0.0.0.0", m));
    let pid = owner_of(&env, &format!("0.0.0.0:{m}"));
    env.stack.kill_registrar();
    kill9(pid);
    assert!(claimed(&env, Proto::Tcp, "0.0.0.0", m), "nothing to sweep");
    env.stack.start_registrar();
    assert!(
        wait_until(Duration::from_secs(10), || !claimed(
            &env,
            Proto::Tcp,
            "0.0.0.0",
            m
        ) && claimed(
            &env,
            Proto::Tcp,
            "::",
            m
        )),
        "the stale claim was not swept: {:?}",
        table(&env)
    );

    // The table deleted by hand comes back, whole.
    let out = env
        .command("nft")
        .args(["delete", "table", "inet", "envoy-docker"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        wait_until(Duration::from_secs(25), || claimed(
            &env,
            Proto::Tcp,
            "::",
            m
        )),
        "the table was not rebuilt"
    );
}

/// The pid of the proxy of the mapping on `host`, from `status`.
fn owner_of(env: &DockerEnv, host: &str) -> i32 {
    let rows = env.stack.status();
    let row = rows
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no mapping for {host}: {rows:#?}"));
    row["owner_pid"].as_i64().unwrap() as i32
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn fw_6_install_apply_leaves_dockers_firewall_on_and_docker_28_takes_the_file() {
    let dir = crate::harness::TempDir::new("fw-install");
    let json = dir.path("etc/docker/daemon.json");
    let install = |extra: &[&str]| {
        std::process::Command::new(crate::harness::bin())
            .arg("install")
            .arg("--prefix")
            .arg(dir.path("usr"))
            .arg("--systemd-dir")
            .arg(dir.path("units"))
            .arg("--daemon-json")
            .arg(&json)
            .args(["--envoy", "/usr/bin/envoy", "--apply"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = install(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(written.get("iptables").is_none(), "{written}");
    assert_eq!(written["userland-proxy"], true);
    // Docker 28 takes the file as it is (and so keeps its default,
    // iptables on).
    let out = std::process::Command::new(Engine::V28.dockerd())
        .args(["--validate", "--config-file"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dockerd --validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The old setup is kept, and what it costs is said.
    std::fs::write(&json, r#"{"iptables": false}"#).unwrap();
    let out = install(&[]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert!(
        said.contains("outbound NAT") && said.contains("isolation"),
        "{said}"
    );
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(kept["iptables"], false);
}

/// A registrar that may not use nftables (nft runs, but as uid 65534, so
/// the kernel refuses): it says so once, `status`, `/healthz` and
/// `/metrics` show that the ports are left to Docker's DNAT, and nothing
/// else changes: a proxy still hands its port over to Envoy.
#[test]
fn fw_8_without_the_right_to_use_nftables_the_registrar_says_so_and_serves_on() {
    use crate::harness::dockerd::Netns;
    use crate::harness::{in_netns, ProxySpec, Stack};
    let ns = Netns::new("edd-nonft", 4);
    ns.make();
    struct Gone(&'static str);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", self.0])
                .output();
        }
    }
    let _gone = Gone("edd-nonft");
    let dir = crate::harness::TempDir::new("nonft");
    let wrapper = dir.path("nft-as-nobody");
    std::fs::write(
        &wrapper,
        // stdin through a pipe of nobody's own, which nft may open.
        "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups \\\n  sh -c 'cat | nft \"$@\"' nft \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut stack = Stack::start_in(
        &ns.name,
        ns.host_ip().into(),
        Ads::Sotw,
        &["--nft", wrapper.to_str().unwrap()],
    );
    let health = || {
        let (_, body) = http_get(stack.registrar_admin, "/healthz").unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || health()["ports"]["state"]
            .get("Unclaimed")
            .is_some()),
        "{}",
        health()
    );
    let h = health();
    assert_eq!(h["ports"]["claimed"], false);
    let detail = h["ports"]["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("Operation not permitted") && detail.contains("past Envoy"),
        "{detail}"
    );
    let metrics = stack.registrar_get("/metrics").1;
    assert!(
        metrics.contains("envoy_docker_ports_claimed 0"),
        "{metrics}"
    );
    // Nothing else breaks: a proxy hands over as before.
    let port = free_port();
    let backend = in_netns(&ns.name, || {
        crate::harness::backend::http("127.0.0.1", "still served")
    });
    let _proxy = in_netns(&ns.name, || {
        stack
            .proxy(ProxySpec::tcp("0.0.0.0", port, backend))
            .ready()
    });
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)));
    let out = stack.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("Published ports: NOT claimed") && text.contains("Operation not permitted"),
        "{text}"
    );
    let log = stack.log();
    assert_eq!(
        log.matches("cannot claim published ports in nftables")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("CAP_NET_ADMIN"), "{log}");
    stack.kill_registrar();
    stack.stop_envoys();
}
