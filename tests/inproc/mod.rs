//! The in-process tier: a registrar started with `registrar::run` inside
//! the test process, on sockets in a private directory, with no Docker and
//! no Envoy. It checks the socket protocol, the admin routes and the
//! metrics without root, and that two registrars in one process share
//! nothing.

use envoy_docker::addr::Addr;
use envoy_docker::mapping::{Mapping, MappingState, Mode, Server};
use envoy_docker::protocol::client;
use envoy_docker::protocol::{Connection, Owner, Registration, Reply, Request};
use envoy_docker::registrar::{self, Config, Listeners};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One registrar in this process, stopped when dropped.
struct InProcess {
    _dir: Dir,
    socket: PathBuf,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), registrar::Error>>>,
}

/// A private directory, removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl InProcess {
    async fn start(tag: &str) -> InProcess {
        InProcess::start_with(tag, |_| {}).await
    }

    /// The same with `tune` applied to the config first.
    async fn start_with(tag: &str, tune: impl FnOnce(&mut Config)) -> InProcess {
        let dir = std::env::temp_dir().join(format!(
            "ed-inproc-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("registrar.sock");
        let mut config = InProcess::config_in(&dir);
        tune(&mut config);
        let listeners = Listeners::bind(&config).await.unwrap();
        let admin = listeners.admin_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(registrar::run(config, listeners, async {
            let _ = rx.await;
        }));
        let r = InProcess {
            _dir: Dir(dir),
            socket,
            admin,
            stop: Some(tx),
            task: Some(task),
        };
        // The admin endpoint is bound before `run` starts; it says 503
        // until xDS is served, which takes a moment on a busy machine. A
        // registrar that never gets there fails the test, loudly.
        let healthy = tokio::time::timeout(Duration::from_secs(30), async {
            while r.get("/healthz").await.0 != 200 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            healthy.is_ok(),
            "the in-process registrar never got healthy"
        );
        r
    }

    /// The config of a registrar whose files are in `dir`: no Docker, no
    /// Envoy, no nftables, admin on a free loopback port.
    fn config_in(dir: &std::path::Path) -> Config {
        Config {
            socket: Some(dir.join("registrar.sock")),
            xds: Addr::Unix(dir.join("xds.sock")),
            default_mode: Mode::Http,
            node_id: "envoy-docker".into(),
            no_recover: true,
            envoy: None,
            docker: Some("none".into()),
            telemetry: Default::default(),
            serving: Default::default(),
            admin: Some(Addr::parse("127.0.0.1:0").unwrap()),
            admin_token_file: None,
            // No Envoy: port 1 refuses, so the dashboard says it cannot
            // read Envoy, whatever else runs on this machine.
            envoy_admin: Addr::parse("127.0.0.1:1").unwrap(),
            proxy_exe: None,
            fleet: None,
            mesh: None,
            // Never the host's nftables from a test process.
            nft: None,
        }
    }

    async fn connect(&self) -> Connection<UnixStream> {
        client::connect(&self.socket, Duration::from_secs(5))
            .await
            .unwrap()
    }

    async fn list(&self) -> Vec<envoy_docker::mapping::MappingStatus> {
        envoy_docker::status::fetch(&self.socket)
            .await
            .unwrap()
            .mappings
    }

    /// `GET path` on the admin endpoint: status code and body.
    async fn get(&self, path: &str) -> (u16, String) {
        let (code, _, body) = self.request("GET", path, "").await;
        (code, body)
    }

    /// Any request with extra header lines: status code, head and body.
    /// (A `Host` among `headers` replaces the admin's own address.)
    async fn request(&self, method: &str, path: &str, headers: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        let host = match headers.to_ascii_lowercase().contains("host:") {
            true => String::new(),
            false => format!("Host: {}\r\n", self.admin),
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\n{host}{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (code, head.to_string(), body.to_string())
    }

    async fn metric(&self, line_start: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Stops it the way SIGTERM does, and waits for the end.
    async fn stop(mut self) -> Result<(), registrar::Error> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn mapping(port: u16) -> Mapping {
    let args: Vec<std::ffi::OsString> = [
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &port.to_string(),
        "-container-ip",
        "172.17.0.2",
        "-container-port",
        "80",
    ]
    .iter()
    .map(std::ffi::OsString::from)
    .collect();
    match envoy_docker::cmdline::parse(&args).unwrap() {
        envoy_docker::cmdline::Command::Run(f) => f.mapping,
        other => panic!("{other:?}"),
    }
}

fn register(m: Mapping) -> Request {
    Request::Register(Registration {
        mapping: m,
        owner: Owner::Connection,
        server: Server::Relay,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_lives_with_its_connection_and_shows_on_every_route() {
    let r = InProcess::start("routes").await;
    let (code, body) = r.get("/healthz").await;
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "serving");
    assert_eq!(health["mappings"], 0);

    let mut proxy = r.connect().await;
    assert_eq!(
        proxy.call(&register(mapping(8080))).await.unwrap(),
        Reply::Accepted
    );
    // With no Envoy the proxy is told to keep relaying; the call above
    // skipped that order, so the connection is in step.
    let rows = r.list().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].mapping, mapping(8080));
    assert_eq!(rows[0].state, MappingState::Pending);

    let (code, body) = r.get("/mappings").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json[0]["host"], "127.0.0.1:8080");
    assert_eq!(json[0]["container"], "172.17.0.2:80");
    assert_eq!(json[0]["served_by"], "relay");
    assert_eq!(
        r.metric("envoy_docker_registrations_total ").await,
        Some(1.0)
    );
    assert_eq!(
        r.metric("envoy_docker_mappings{proto=\"tcp\",state=\"pending\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(r.get("/nothing").await.0, 404);

    // The same mapping again (as a proxy that reconnects sends it) changes
    // nothing.
    let mut again = r.connect().await;
    assert_eq!(
        again.call(&register(mapping(8080))).await.unwrap(),
        Reply::Accepted
    );
    assert_eq!(r.list().await.len(), 1);
    drop(again);

    // The connection closing ends the mapping.
    drop(proxy);
    let gone = async {
        while !r.list().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the mapping outlived its connection");
    assert_eq!(
        r.metric("envoy_docker_deregistrations_total ").await,
        Some(1.0)
    );
    let socket = r.socket.clone();
    r.stop().await.unwrap();
    assert!(!socket.exists(), "the socket file stays after a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_gets_an_error_and_loses_no_state() {
    let r = InProcess::start("garbage").await;
    let mut keeper = r.connect().await;
    assert_eq!(
        keeper.call(&register(mapping(9090))).await.unwrap(),
        Reply::Accepted
    );

    for junk in [
        &b"\x00\x00\x00\x05hello"[..],
        &[0xff; 64][..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
    ] {
        let mut raw = UnixStream::connect(&r.socket).await.unwrap();
        raw.write_all(junk).await.unwrap();
        let mut out = Vec::new();
        // Answered (with an error) or closed, within the frame deadline.
        let _ = tokio::time::timeout(Duration::from_secs(7), raw.read_to_end(&mut out)).await;
    }
    let rows = r.list().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].mapping, mapping(9090));
    drop(keeper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrars_in_one_process_share_nothing() {
    let (a, b) = (InProcess::start("a").await, InProcess::start("b").await);
    let mut p = a.connect().await;
    assert_eq!(
        p.call(&register(mapping(7070))).await.unwrap(),
        Reply::Accepted
    );
    assert_eq!(a.list().await.len(), 1);
    assert!(b.list().await.is_empty());
    assert_eq!(
        a.metric("envoy_docker_registrations_total ").await,
        Some(1.0)
    );
    assert_eq!(
        b.metric("envoy_docker_registrations_total ").await,
        Some(0.0)
    );
    drop(p);
}

/// Descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_started_and_stopped_twenty_times_leaves_nothing_behind() {
    let rt = tokio::runtime::Handle::current();
    // One run first: whatever the process sets up once (the runtime's own
    // descriptors, lazily made statics) is not a leak.
    InProcess::start("warm").await.stop().await.unwrap();
    let (tasks, fds) = (rt.metrics().num_alive_tasks(), open_fds());
    for i in 0..20 {
        let r = InProcess::start(&format!("loop{i}")).await;
        // A proxy connection and an admin connection open while it stops.
        let mut conn = r.connect().await;
        let _ = conn.call(&register(mapping(40000 + i))).await.unwrap();
        let admin = TcpStream::connect(r.admin).await.unwrap();
        let socket = r.socket.clone();
        let stopping = std::time::Instant::now();
        r.stop().await.unwrap();
        let took = stopping.elapsed();
        assert!(!socket.exists(), "run {i} left its socket file");
        assert!(
            took < Duration::from_secs(5),
            "run {i} took {took:?} to stop"
        );
        drop((conn, admin));
    }
    // What the runs spawned has ended: poll until the counts settle, with a
    // bound, since a task's end is seen a moment after it is aborted.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while rt.metrics().num_alive_tasks() > tasks || open_fds() > fds {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "left behind: {} task(s) (was {tasks}), {} descriptor(s) (was {fds})",
        rt.metrics().num_alive_tasks(),
        open_fds()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_api_is_read_only_versioned_and_sent_with_strict_headers() {
    let r = InProcess::start("dashboard").await;
    let (code, head, page) = r
        .request("GET", "/", "Origin: http://elsewhere.test\r\n")
        .await;
    assert_eq!(code, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{head}"
    );
    assert!(!head.contains("access-control-"), "CORS headers: {head}");
    assert!(page.contains("/app.js"), "{page}");
    let (code, head, _) = r.request("GET", "/app.js", "").await;
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript"),
        "{head}"
    );

    let mut proxy = r.connect().await;
    assert_eq!(
        proxy.call(&register(mapping(8181))).await.unwrap(),
        Reply::Accepted
    );
    let (code, body) = r.get("/api/v1/overview").await;
    assert_eq!(code, 200, "{body}");
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(o["api"], 1);
    assert_eq!(o["mappings"], 1);
    assert_eq!(o["envoys_connected"], 0);
    assert_eq!(o["ports"]["claimed"], false);
    assert_eq!(o["fleet"], serde_json::Value::Null);

    let (code, body) = r.get("/api/v1/mappings").await;
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &m["mappings"][0];
    assert_eq!(row["id"], "tcp_127-0-0-1_8181");
    assert_eq!(row["host"], "127.0.0.1:8181");
    assert_eq!(row["backend"], "172.17.0.2:80");
    assert_eq!(row["served_by"], "relay");
    // No Envoy to read stats from here.
    assert!(row["live"].is_null(), "{row}");

    let (code, body) = r.get("/api/v1/mappings/tcp_127-0-0-1_8181").await;
    assert_eq!(code, 200, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["mapping"]["id"], "tcp_127-0-0-1_8181");
    assert_eq!(d["events"][0]["kind"], "register", "{d}");
    assert!(
        d["envoy"]["error"].is_string(),
        "no Envoy, so an error: {d}"
    );
    assert_eq!(r.get("/api/v1/mappings/tcp_127-0-0-1_1").await.0, 404);
    assert_eq!(r.get("/api/v1/mappings/..%2f").await.0, 404);
    assert_eq!(r.get("/api/v1/nothing").await.0, 404);
    let (code, body) = r.get("/api/v1/fleet").await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""enabled":false"#), "{body}");

    // DNS rebinding: another site's name for 127.0.0.1 reads nothing.
    let (code, _, body) = r
        .request("GET", "/api/v1/mappings", "Host: evil.example:18001\r\n")
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("8181"), "{body}");
    let (code, _, _) = r
        .request("GET", "/api/v1/mappings", "Host: localhost:18001\r\n")
        .await;
    assert_eq!(code, 200);

    // Read only: nothing but GET.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in [
            "/api/v1/mappings",
            "/api/v1/mappings/tcp_127-0-0-1_8181",
            "/",
        ] {
            assert_eq!(r.request(method, path, "").await.0, 405, "{method} {path}");
        }
    }
    drop(proxy);
    let gone = async {
        loop {
            let (_, body) = r.get("/api/v1/events").await;
            let e: serde_json::Value = serde_json::from_str(&body).unwrap();
            if e["events"][0]["kind"] == "remove" {
                break e;
            }
            // As `InProcess::start` waits: each round is one request.
            tokio::task::yield_now().await;
        }
    };
    let events = tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the removal never showed in the events");
    assert_eq!(events["events"][0]["mapping"], "tcp_127-0-0-1_8181");
    assert_eq!(events["events"][1]["kind"], "register", "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_admin_wants_its_token_and_refuses_to_start_without_one() {
    let dir = std::env::temp_dir().join(format!("ed-inproc-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = Dir(dir.clone());
    // 0.0.0.0 is not loopback: without a token file, no start.
    let config = Config {
        socket: Some(dir.join("r.sock")),
        admin: Some(Addr::parse("0.0.0.0:0").unwrap()),
        admin_token_file: None,
        ..InProcess::config_in(&dir)
    };
    match Listeners::bind(&config).await {
        Err(registrar::Error::AdminToken(e)) => {
            assert!(e.to_string().contains("--admin-token-file"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a non-loopback admin started without a token"),
    }

    let token = dir.join("token");
    std::fs::write(&token, "sesame\n").unwrap();
    let r = InProcess::start_with("token", |c| {
        c.admin = Some(Addr::parse("0.0.0.0:0").unwrap());
        c.admin_token_file = Some(token.clone());
    })
    .await;
    for path in [
        "/",
        "/api/v1/mappings",
        "/api/v1/overview",
        "/metrics",
        "/mappings",
    ] {
        let (code, head, _) = r.request("GET", path, "").await;
        assert_eq!(code, 401, "{path} without the token");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{head}"
        );
        let (code, _, _) = r
            .request("GET", path, "Authorization: Bearer sesam\r\n")
            .await;
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _, _) = r
            .request("GET", path, "Authorization: Bearer sesame\r\n")
            .await;
        assert_eq!(code, 200, "{path} with the token");
    }
    // "admin:sesame", as a browser sends it after asking.
    let (code, _, _) = r
        .request(
            "GET",
            "/api/v1/mappings",
            "Authorization: Basic YWRtaW46c2VzYW1l\r\n",
        )
        .await;
    assert_eq!(code, 200);
    // Health checks need no token.
    assert_eq!(r.request("GET", "/healthz", "").await.0, 200);
}
