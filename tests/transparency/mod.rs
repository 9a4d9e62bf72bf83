//! The transparency issue's scenarios: whatever passes through docker-proxy
//! passes through envoy-docker unchanged. Real servers only (peers.py,
//! openssl, PostgreSQL, grpcio), on loopback with proxies spawned as dockerd
//! spawns them, or in containers of the real dockerd.
//!
//! The default mode is `auto`, so every test that does not set a mode tests
//! the http_inspector's sorting.

use crate::harness::dockerd::{self, IMAGE};
use crate::harness::peers::{self, connect_from, exchange, Peer, Postgres, TlsServer};
use crate::harness::{admin_get, free_port, wait_until, Ads, ProxySpec, Stack, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The stat prefix of a loopback mapping, from `status`.
fn prefix(stack: &Stack, port: u16) -> String {
    let rows = stack.status();
    let row = rows
        .iter()
        .find(|r| {
            r["host"]
                .as_str()
                .is_some_and(|h| h.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| panic!("no row for {port}: {rows:#?}"));
    format!("{}_tcp_127-0-0-1_{port}", row["name"].as_str().unwrap())
}

/// Connections that went to tcp_proxy, and HTTP requests to the HTTP
/// connection manager, under one stat prefix.
fn counts(stack: &Stack, prefix: &str) -> (u64, u64) {
    let tcp = stack
        .stat(&format!("tcp.{prefix}.downstream_cx_total"))
        .unwrap_or(0);
    let http = stack
        .stat(&format!("http.{prefix}.downstream_rq_total"))
        .unwrap_or(0);
    (tcp, http)
}

#[test]
fn auto_1_http11_goes_to_the_http_connection_manager_and_is_counted() {
    // A long sniff timeout: what is tested here is the sorting, which a
    // starved test machine must not turn into a timeout.
    let stack = Stack::start_with(Ads::Delta, &["--sniff-timeout", "10s"]);
    let be = Peer::start(&["http", "--bind", "127.0.0.2"]);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, be.addr("127.0.0.2")))
        .ready();
    assert_eq!(stack.status()[0]["mode"], "auto");
    for _ in 0..3 {
        let got = exchange(
            TcpStream::connect(local(port)).unwrap(),
            b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }
    let p = prefix(&stack, port);
    assert_eq!(
        stack.stat(&format!("http.{p}.downstream_rq_2xx")),
        Some(3),
        "{}",
        admin_get(stack.admin, "/stats?filter=127-0-0-1")
    );
    assert_eq!(counts(&stack, &p).0, 0, "nothing went to tcp_proxy");
    assert_eq!(stack.stat("http_inspector.http11_found"), Some(3));

    // A websocket upgrade goes through, and then the bytes flow both ways.
    let s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    (&s).write_all(b"frames are just bytes here\n").unwrap();
    let mut echoed = String::new();
    reader.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "frames are just bytes here\n");
    assert_eq!(
        stack.stat(&format!("http.{p}.downstream_cx_upgrades_total")),
        Some(1)
    );
}

#[test]
fn auto_2_tls_passes_through_with_the_backends_own_certificate() {
    let dir = TempDir::new("tls");
    let (cert, key) = peers::self_signed(&dir);
    let backend = SocketAddr::from(([127, 0, 0, 2], free_port()));
    let _server = TlsServer::start(backend, &cert, &key);
    let stack = Stack::start(Ads::Sotw);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, backend))
        .ready();

    let direct = peers::presented_cert(backend);
    let through = peers::presented_cert(local(port));
    assert_eq!(through, direct, "the certificate changed on the way");
    let file = std::fs::read_to_string(&cert).unwrap();
    assert_eq!(through.trim(), file.trim());
    // And a whole request over TLS gets s_server's status page.
    let page = peers::output(
        Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-ign_eof",
                "-connect",
                &local(port).to_string(),
            ])
            .stderr(std::process::Stdio::null())
            .stdin(std::fs::File::open(write_file(&dir, "get", "GET / HTTP/1.0\r\n\r\n")).unwrap()),
    );
    assert!(page.contains("HTTP/1.0 200 ok"), "{page}");
    let (tcp, http) = counts(&stack, &prefix(&stack, port));
    assert!(tcp >= 2 && http == 0, "tcp {tcp}, http {http}");
}

fn write_file(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn auto_3_postgres_on_loopback_answers_psql() {
    let dir = TempDir::new("pg");
    let pg = Postgres::start(&dir, "127.0.0.2");
    let stack = Stack::start(Ads::Delta);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, pg.addr))
        .ready();
    assert_eq!(
        peers::psql(local(port), "select 6 * 7").unwrap(),
        "42",
        "{}",
        stack.envoy_log()
    );
    let (tcp, http) = counts(&stack, &prefix(&stack, port));
    assert!(tcp >= 1 && http == 0, "tcp {tcp}, http {http}");
}

#[test]
fn auto_4_a_server_first_protocol_gets_its_banner_out() {
    let stack = Stack::start(Ads::Sotw);
    let be = Peer::start(&["banner", "--bind", "127.0.0.2"]);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, be.addr("127.0.0.2")))
        .ready();
    let s = TcpStream::connect(local(port)).unwrap();
    // The client says nothing until the server has spoken: the sniff
    // timeout must run out and hand the connection to tcp_proxy.
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut banner = String::new();
    reader.read_line(&mut banner).expect("no banner within 1 s");
    assert_eq!(banner, "220 peers banner ready\r\n");
    (&s).write_all(b"HELO test\r\n").unwrap();
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert_eq!(reply, "250 got HELO test\r\n");
    let (tcp, http) = counts(&stack, &prefix(&stack, port));
    assert_eq!((tcp, http), (1, 0));
}

#[test]
fn auto_5_grpc_stays_http2_end_to_end() {
    let stack = Stack::start_with(Ads::Delta, &["--sniff-timeout", "10s"]);
    let be = Peer::start(&["grpc-server", "--bind", "127.0.0.2"]);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, be.addr("127.0.0.2")))
        .ready();
    let out = peers::output(Command::new("python3").arg(peers::script()).args([
        "grpc-client",
        "--target",
        &local(port).to_string(),
        "--count",
        "7",
    ]));
    assert_eq!(out, "unary ok\nstream 7\n");
    let p = prefix(&stack, port);
    assert_eq!(
        stack.stat(&format!("http.{p}.downstream_rq_http2_total")),
        Some(2)
    );
    assert_eq!(stack.stat(&format!("http.{p}.downstream_rq_2xx")), Some(2));
    // Upstream, too, it went as HTTP/2.
    let cluster = format!("cluster.{p}.upstream_cx_http2_total");
    assert!(stack.stat(&cluster).unwrap_or(0) >= 1, "{cluster}");
    assert_eq!(
        stack.stat(&format!("cluster.{p}.upstream_cx_http1_total")),
        Some(0)
    );
}

#[test]
fn limits_8_no_idle_timeouts_and_three_thousand_idle_connections_stay_open() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // The test, Envoy (started below) and the backend each hold 3,000.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let stack = Stack::start(Ads::Delta);
    let dir = TempDir::new("idle");
    let status = dir.path("idle.status");
    let be = Peer::start(&[
        "idle",
        "--bind",
        "127.0.0.2",
        "--status",
        status.to_str().unwrap(),
    ]);
    let port = free_port();
    let _p = stack
        .proxy(ProxySpec::tcp("127.0.0.1", port, be.addr("127.0.0.2")))
        .ready();

    // Neither filter has an idle timeout, in what Envoy holds.
    let dump: serde_json::Value = serde_json::from_str(&admin_get(
        stack.admin,
        "/config_dump?resource=dynamic_listeners",
    ))
    .unwrap();
    let listener = &dump["configs"][0]["active_state"]["listener"];
    let tcp = &listener["default_filter_chain"]["filters"][0]["typed_config"];
    assert_eq!(tcp["idle_timeout"], "0s", "{listener:#}");
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(hcm["stream_idle_timeout"], "0s", "{hcm:#}");
    assert_eq!(hcm["common_http_protocol_options"]["idle_timeout"], "0s");
    assert_eq!(hcm["server_header_transformation"], "PASS_THROUGH");
    let clusters: serde_json::Value = serde_json::from_str(&admin_get(
        stack.admin,
        "/config_dump?resource=dynamic_active_clusters",
    ))
    .unwrap();
    let breakers = &clusters["configs"][0]["cluster"]["circuit_breakers"]["thresholds"][0];
    assert_eq!(breakers["max_connections"], 4294967295u64, "{breakers:#}");

    // 3,000 idle connections, far past the old default cap of 1,024. A
    // silent client goes to tcp_proxy once the sniff timeout runs out.
    const N: usize = 3000;
    let held: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(local(port)).unwrap())
        .collect();
    let open_at_backend = |want: &str| {
        wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&status)
                .unwrap_or_default()
                .starts_with(want)
        })
    };
    assert!(
        open_at_backend(&format!("open={N} ")),
        "backend has {:?}",
        std::fs::read_to_string(&status)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        std::fs::read_to_string(&status)
            .unwrap()
            .starts_with(&format!("open={N} accepted={N}")),
        "some closed"
    );
    for s in &held {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let e = (&*s).read(&mut b).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "a connection ended"
        );
    }
    assert_eq!(
        stack.stat(&format!("listener.127.0.0.1_{port}.downstream_cx_active")),
        Some(N as u64)
    );
    drop(held);
    assert!(open_at_backend("open=0 "));
}

// The scenarios on the real dockerd.

/// Waits until `what` answers through the published port; panics with the
/// container's log if it never does.
fn wait_for(env: &dockerd::DockerEnv, id: &str, mut what: impl FnMut() -> bool) {
    if !wait_until(Duration::from_secs(60), &mut what) {
        let logs = env.docker(&["logs", id]);
        panic!(
            "container {id} never answered:\n{}{}\nregistrar:\n{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr),
            dockerd::tail(&env.stack.log(), 20)
        );
    }
}

fn run_with_host_binaries(env: &dockerd::DockerEnv, args: &[&str]) -> String {
    let mut all: Vec<String> = peers::container_args();
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    env.run(&all)
}

#[test]
fn docker_auto_3_postgres_in_a_container_answers_psql() {
    let env = dockerd::shared();
    let h = free_port();
    let bin = peers::postgres_bin();
    let script = peers::postgres_script(&bin, "/tmp/pg", "*", 5432);
    let id = run_with_host_binaries(
        &env,
        &[
            "-p",
            &format!("{h}:5432"),
            "--name",
            "pg1",
            "--user",
            "65534:65534",
            IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    wait_for(&env, &id, || peers::psql(local(h), "select 1").is_ok());
    assert_eq!(
        peers::psql(local(h), "select current_user || ' ' || 6 * 7").unwrap(),
        "postgres 42"
    );
    let p = format!("pg1_tcp_0-0-0-0_{h}");
    assert!(
        env.stack
            .stat(&format!("tcp.{p}.downstream_cx_total"))
            .unwrap_or(0)
            >= 1
    );
    assert_eq!(
        env.stack
            .stat(&format!("http.{p}.downstream_rq_total"))
            .unwrap_or(0),
        0,
        "PostgreSQL went to the HTTP connection manager"
    );
}

#[test]
fn docker_http_6_details_pass_through_unchanged() {
    let env = dockerd::shared();
    let h = free_port();
    let id = run_with_host_binaries(
        &env,
        &[
            "-p",
            &format!("{h}:80"),
            "--name",
            "details1",
            "-l",
            "ProxyMode=http",
            IMAGE,
            "/usr/bin/python3",
            "/peers/peers.py",
            "http",
            "--port",
            "80",
            "--server",
            "Backend/7.1 (details)",
        ],
    );
    let addr = local(h);
    wait_for(&env, &id, || {
        TcpStream::connect(addr)
            .is_ok_and(|s| exchange(s, b"GET / HTTP/1.0\r\n\r\n").contains(" 200 "))
    });

    // HTTP/1.0, with no Host header at all. Envoy speaks HTTP/1.1 to the
    // backend, so it gives the request a Host.
    let got = exchange(
        connect_from("127.0.0.5", addr),
        b"GET /old HTTP/1.0\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
    assert!(
        got.contains("GET /old HTTP/1.1\r\nhost: localhost\r\n"),
        "{got}"
    );

    // Header names as the client wrote them; Server and the backend's own
    // header case as the backend wrote them; the client's address appended.
    // The client comes from the bridge's address: for a loopback client
    // Envoy appends the host's own address instead.
    let gateway = SocketAddr::new(dockerd::GATEWAY.parse().unwrap(), h);
    let got = exchange(
        connect_from(dockerd::GATEWAY, gateway),
        b"GET /echo HTTP/1.1\r\nHost: details\r\nX-MiXeD-Case: 1\r\nuser-AGENT: raw\r\n\
          X-Forwarded-For: 10.9.8.7\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("\r\nServer: Backend/7.1 (details)\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nX-Backend-Case: MiXeD\r\n"), "{head}");
    assert!(body.contains("\r\nX-MiXeD-Case: 1\r\n"), "{body}");
    assert!(body.contains("\r\nuser-AGENT: raw\r\n"), "{body}");
    let xff = body
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
        .unwrap_or_else(|| panic!("no X-Forwarded-For in {body}"));
    assert_eq!(
        xff.split_once(':').unwrap().1.trim(),
        format!("10.9.8.7,{}", dockerd::GATEWAY)
    );
    assert!(
        !body.to_ascii_lowercase().contains("x-envoy"),
        "no Envoy-only header reaches the backend: {body}"
    );

    // 100-continue reaches the backend, and its 100 reaches the client.
    let got = exchange(
        connect_from("127.0.0.5", addr),
        b"POST /echo HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\
          Connection: close\r\n\r\nhi",
    );
    assert!(got.starts_with("HTTP/1.1 100 Continue\r\n"), "{got}");
    assert!(got.contains("\r\nExpect: 100-continue\r\n"), "{got}");

    // 100 MB each way, byte for byte.
    let dir = TempDir::new("details");
    let upload = dir.path("up.bin");
    peers::output(
        Command::new("head")
            .args(["-c", "100M", "/dev/urandom"])
            .stdout(std::fs::File::create(&upload).unwrap()),
    );
    let url = format!("http://{addr}");
    let said = peers::output(
        Command::new("curl")
            .args(["-sS", "--fail", "--data-binary"])
            .arg(format!("@{}", upload.display()))
            .arg(format!("{url}/sha256")),
    );
    assert_eq!(
        said.trim(),
        format!("{} {}", peers::sha256_of(&upload), 100 << 20)
    );
    let download = dir.path("down.bin");
    let headers = peers::output(
        Command::new("curl")
            .args(["-sS", "--fail", "-D", "-", "-o"])
            .arg(&download)
            .arg(format!("{url}/bytes?n={}", 100 << 20)),
    );
    let want = headers
        .lines()
        .find_map(|l| l.strip_prefix("X-Sha256: "))
        .unwrap_or_else(|| panic!("{headers}"))
        .trim()
        .to_string();
    assert_eq!(std::fs::metadata(&download).unwrap().len(), 100 << 20);
    assert_eq!(peers::sha256_of(&download), want);
    let p = format!("details1_tcp_0-0-0-0_{h}");
    assert!(
        env.stack
            .stat(&format!("http.{p}.downstream_rq_2xx"))
            .unwrap()
            >= 5
    );
}

#[test]
fn docker_tcp_7_proxy_protocol_v2_gives_the_backend_the_client_address() {
    let env = dockerd::shared();
    let h = free_port();
    let id = run_with_host_binaries(
        &env,
        &[
            "-p",
            &format!("{h}:7000"),
            "--name",
            "pp1",
            "-l",
            "ProxyMode=tcp",
            "-l",
            "ProxyProtocol=v2",
            IMAGE,
            "/usr/bin/python3",
            "/peers/peers.py",
            "proxy-protocol",
            "--port",
            "7000",
        ],
    );
    let addr = local(h);
    let mut line = String::new();
    wait_for(&env, &id, || {
        let s = connect_from("127.0.0.5", addr);
        let local_port = s.local_addr().unwrap().port();
        line.clear();
        let mut r = BufReader::new(s);
        r.read_line(&mut line).is_ok()
            && line.starts_with("version=2 client=127.0.0.5:")
            && line.contains(&format!("127.0.0.5:{local_port} "))
    });
    assert!(line.contains(&format!("dest=127.0.0.1:{h}")), "{line}");
    // The rest of the stream is the client's, untouched.
    let s = connect_from("127.0.0.5", addr);
    (&s).write_all(b"payload\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    (&s).read_to_string(&mut all).unwrap();
    assert!(all.ends_with("\npayload\n"), "{all}");
}

#[test]
fn docker_9_a_port_label_overrides_the_container_mode() {
    let env = dockerd::shared();
    let (web, db) = (free_port(), free_port());
    let id = run_with_host_binaries(
        &env,
        &[
            "-p",
            &format!("{web}:80"),
            "-p",
            &format!("{db}:5432"),
            "--name",
            "perport1",
            "-l",
            "ProxyMode=http",
            "-l",
            "ProxyMode_5432=tcp",
            "-l",
            "ProxyMode_9=bogus",
            IMAGE,
            "/bin/sh",
            "-c",
            "/usr/bin/python3 /peers/peers.py banner --port 5432 & \
             exec /usr/bin/python3 /peers/peers.py http --port 80",
        ],
    );
    wait_for(&env, &id, || {
        TcpStream::connect(local(web))
            .is_ok_and(|s| exchange(s, b"GET / HTTP/1.0\r\n\r\n").contains(" 200 "))
    });
    // The banner server starts beside the HTTP one; until it listens, a
    // connection to its port is closed at once.
    wait_for(&env, &id, || {
        TcpStream::connect(local(db)).is_ok_and(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("220 ")
        })
    });
    assert!(
        wait_until(Duration::from_secs(15), || {
            env.stack
                .status()
                .iter()
                .filter(|r| r["name"] == "perport1")
                .filter(|r| r["host"].as_str().unwrap().starts_with("0.0.0.0:"))
                .count()
                == 2
        }),
        "{:#?}",
        env.stack.status()
    );
    let rows = env.stack.status();
    let mode_of_now = |port: u16| {
        rows.iter()
            .find(|r| r["host"] == format!("0.0.0.0:{port}"))
            .map(|r| r["mode"].as_str().unwrap().to_string())
    };
    assert_eq!(mode_of_now(web).as_deref(), Some("http"), "{rows:#?}");
    assert_eq!(mode_of_now(db).as_deref(), Some("tcp"), "{rows:#?}");

    // The tcp port speaks first with no sniffing delay in the way.
    let s = TcpStream::connect(local(db)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut banner = String::new();
    BufReader::new(s).read_line(&mut banner).unwrap();
    assert_eq!(banner, "220 peers banner ready\r\n");
    let (pw, pd) = (
        format!("perport1_tcp_0-0-0-0_{web}"),
        format!("perport1_tcp_0-0-0-0_{db}"),
    );
    assert!(
        env.stack
            .stat(&format!("http.{pw}.downstream_rq_2xx"))
            .unwrap()
            >= 1
    );
    assert!(
        env.stack
            .stat(&format!("tcp.{pd}.downstream_cx_total"))
            .unwrap_or(0)
            >= 2
    );
    // What Envoy holds: no sniffing on either port; one HTTP, one TCP.
    let dump = admin_get(env.stack.admin, "/config_dump?resource=dynamic_listeners");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    for (port, filter) in [(web, "http_connection_manager"), (db, "tcp_proxy")] {
        let l = dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["active_state"]["listener"])
            .find(|l| l["address"]["socket_address"]["port_value"] == port)
            .unwrap();
        assert!(l["listener_filters"].is_null(), "{l:#}");
        assert_eq!(
            l["filter_chains"][0]["filters"][0]["name"],
            format!("envoy.filters.network.{filter}")
        );
    }
    assert!(env.stack.log().contains("ProxyMode_9=\"bogus\""));
}
