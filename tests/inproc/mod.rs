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
        let dir = std::env::temp_dir().join(format!(
            "ed-inproc-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("registrar.sock");
        let config = Config {
            socket: Some(socket.clone()),
            xds: Addr::Unix(dir.join("xds.sock")),
            default_mode: Mode::Http,
            node_id: "envoy-docker".into(),
            no_recover: true,
            envoy: None,
            docker: Some("none".into()),
            telemetry: Default::default(),
            serving: Default::default(),
            admin: Some(Addr::parse("127.0.0.1:0").unwrap()),
            envoy_admin: Addr::parse("127.0.0.1:9901").unwrap(),
            proxy_exe: None,
            fleet: None,
            // Never the host's nftables from a test process.
            nft: None,
        };
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
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (code, body.to_string())
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
