//! Private Docker daemons for the end-to-end tests, with envoy-docker as
//! their userland proxy (`--userland-proxy-path` pointing at a
//! `docker-proxy` symlink to the freshly built binary), each with its own
//! data root, exec root, socket, pidfile and bridge, and a registrar
//! (following that dockerd) and a real Envoy beside it. Three setups:
//! - [`Setup::Legacy`]: Debian 12's dockerd 20.10 in this process's own
//!   network namespace with `--iptables=false`, the setup before issue 18.
//!   Clients reach published ports on loopback. The registrar claims
//!   nothing (`--nft none`): this namespace is the machine's own.
//! - [`Setup::Firewalled`]`(engine)`: Debian 12's 20.10, or Debian
//!   unstable's 28.x, as users run them: Docker's firewall on (iptables,
//!   its default), so inside a network namespace of its own that the test
//!   makes and that takes Docker's rules away with it. Entered with
//!   `nsenter --net`, as `ip netns exec` would hide the cgroup mounts. Its
//!   only link is a veth to this process, which is therefore an outside
//!   host: at [`DockerEnv::outside_ip`], reaching the Docker host at
//!   [`DockerEnv::host_ip`]. The registrar claims the published ports in
//!   that namespace's nftables.
//!
//! One daemon per setup serves the whole test binary; its tests take turns
//! through a mutex. Each is torn down when the process exits, and the
//! teardown checks that no mount, interface or process is left behind.

use super::{bin, ip, sh, wait_until, Ads, Stack};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub const IMAGE: &str = "envoy-docker-test:busybox";
const BRIDGE: &str = "edtest0";
const BRIDGE_CIDR: &str = "172.29.7.1/24";
/// The host's address on that bridge (the same in every setup: each
/// firewalled daemon has its namespace to itself).
pub const GATEWAY: &str = "172.29.7.1";

/// Where `.ci/fetch-docker28` puts Debian unstable's Docker 28.
pub const DOCKERD_28_DEFAULT: &str = "/var/cache/envoy-docker-ci/docker28/x/usr/sbin/dockerd";
/// Names another Docker 28 dockerd binary.
pub const DOCKERD_28_ENV: &str = "ENVOY_DOCKER_DOCKERD_28";

/// Which dockerd.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Engine {
    /// Debian 12's docker.io, 20.10.
    V20,
    /// Debian unstable's docker.io, 28.x, fetched by `.ci/fetch-docker28`.
    V28,
}

impl Engine {
    pub fn dockerd(self) -> String {
        match self {
            Engine::V20 => "dockerd".into(),
            Engine::V28 => {
                let path = std::env::var(DOCKERD_28_ENV).unwrap_or(DOCKERD_28_DEFAULT.into());
                assert!(
                    Path::new(&path).exists(),
                    "no Docker 28 dockerd at {path}: run .ci/fetch-docker28 (or set \
                     {DOCKERD_28_ENV}); the suite runs the dockerd tier on 20.10 and 28"
                );
                path
            }
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Engine::V20 => "20",
            Engine::V28 => "28",
        }
    }

    /// The x in 10.79.x.0/24, the veth's subnet.
    fn index(self) -> u8 {
        match self {
            Engine::V20 => 1,
            Engine::V28 => 2,
        }
    }
}

/// How a shared daemon runs; see the module's documentation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    Legacy,
    Firewalled(Engine),
}

impl Setup {
    fn slot(self) -> usize {
        match self {
            Setup::Legacy => 0,
            Setup::Firewalled(Engine::V20) => 1,
            Setup::Firewalled(Engine::V28) => 2,
        }
    }

    pub fn engine(self) -> Engine {
        match self {
            Setup::Legacy => Engine::V20,
            Setup::Firewalled(e) => e,
        }
    }
}

/// The namespace of a firewalled daemon and its veth.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
    index: u8,
}

impl Netns {
    /// Namespace `name`, on veth subnet 10.79.`index`.0/24; not made yet.
    pub fn new(name: &str, index: u8) -> Netns {
        Netns {
            name: name.into(),
            index,
        }
    }

    /// The Docker host's address on the veth.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.index, 2)
    }

    pub fn host_ip6(&self) -> Ipv6Addr {
        format!("fd79:0:{}::2", self.index).parse().unwrap()
    }

    /// This process's address on the veth: an outside host's.
    pub fn outside_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.index, 1)
    }

    /// Makes the namespace, its veth to this one, and its bridge
    /// (`edtest0`, the gateway [`GATEWAY`]).
    pub fn make(&self) {
        let _ = sh(Command::new("ip").args(["netns", "delete", &self.name]));
        let _ = sh(Command::new("ip").args(["link", "delete", &self.name]));
        let inside = format!("{}i", self.name);
        let i = self.index;
        ip(&["netns", "add", &self.name]);
        ip(&[
            "link", "add", &self.name, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &self.name]);
        ip(&["addr", "add", &format!("10.79.{i}.1/24"), "dev", &self.name]);
        ip(&[
            "addr",
            "add",
            &format!("fd79:0:{i}::1/64"),
            "dev",
            &self.name,
            "nodad",
        ]);
        ip(&["link", "set", &self.name, "up"]);
        let n = self.name.as_str();
        for args in [
            vec!["addr", "add", &format!("10.79.{i}.2/24"), "dev", &inside],
            vec![
                "addr",
                "add",
                &format!("fd79:0:{i}::2/64"),
                "dev",
                &inside,
                "nodad",
            ],
            vec!["link", "set", &inside, "up"],
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", BRIDGE_CIDR, "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            let mut all = vec!["-n", n];
            all.extend(args.iter().copied());
            ip(&all);
        }
    }
}

pub struct DockerEnv {
    pub setup: Setup,
    pub root: PathBuf,
    pub stack: Stack,
    pub sock: PathBuf,
    /// The firewalled daemon's namespace; `None` for the legacy one.
    pub netns: Option<Netns>,
    dockerd: Option<Child>,
}

static ENVS: [OnceLock<Mutex<DockerEnv>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// The legacy daemon (20.10, iptables off, this namespace), started on
/// first use; holding the guard gives a test the daemon to itself.
pub fn shared() -> MutexGuard<'static, DockerEnv> {
    shared_on(Setup::Legacy)
}

/// The daemon of `setup`, started on first use.
pub fn shared_on(setup: Setup) -> MutexGuard<'static, DockerEnv> {
    let env = ENVS[setup.slot()].get_or_init(|| {
        let env = DockerEnv::start(setup);
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain extern "C" function; it runs once at exit.
        AT_EXIT.call_once(|| unsafe {
            nix::libc::atexit(teardown_at_exit);
        });
        Mutex::new(env)
    });
    let guard = env.lock().unwrap_or_else(|p| p.into_inner());
    guard.remove_all_containers();
    guard
}

extern "C" fn teardown_at_exit() {
    let mut failed = false;
    for slot in &ENVS {
        if let Some(env) = slot.get() {
            let mut env = env.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(leftovers) = env.teardown() {
                eprintln!(
                    "dockerd ({:?}) teardown left things behind:\n{leftovers}",
                    env.setup
                );
                failed = true;
            }
        }
    }
    if failed {
        // SAFETY: ending the process with a failure status at exit.
        unsafe { nix::libc::_exit(1) };
    }
}

impl DockerEnv {
    fn start(setup: Setup) -> DockerEnv {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the dockerd tests need root"
        );
        let tag = match setup {
            Setup::Legacy => "legacy".to_string(),
            Setup::Firewalled(e) => format!("fw{}", e.tag()),
        };
        let root = PathBuf::from(format!("/tmp/ed-dockerd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::os::unix::fs::symlink(bin(), root.join("bin/docker-proxy")).unwrap();
        let sock = root.join("docker.sock");
        let docker = format!("unix://{}", sock.display());

        let (netns, stack) = match setup {
            Setup::Legacy => {
                let _ = sh(Command::new("ip").args(["link", "delete", BRIDGE]));
                for args in [
                    vec!["link", "add", BRIDGE, "type", "bridge"],
                    vec!["addr", "add", BRIDGE_CIDR, "dev", BRIDGE],
                    vec!["link", "set", BRIDGE, "up"],
                ] {
                    ip(&args);
                }
                (None, Stack::start_with(Ads::Sotw, &["--docker", &docker]))
            }
            Setup::Firewalled(engine) => {
                let ns = Netns::new(&format!("edd-{}", engine.tag()), engine.index());
                ns.make();
                let stack = Stack::start_in(
                    &ns.name,
                    ns.host_ip().into(),
                    Ads::Sotw,
                    &["--docker", &docker, "--nft", "nft"],
                );
                (Some(ns), stack)
            }
        };
        let mut env = DockerEnv {
            setup,
            root,
            stack,
            sock,
            netns,
            dockerd: None,
        };
        env.start_dockerd();
        env.build_image();
        env
    }

    pub fn start_dockerd(&mut self) {
        assert!(self.dockerd.is_none());
        let r = &self.root;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.join("dockerd.log"))
            .unwrap();
        let dockerd = self.setup.engine().dockerd();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name))
                    .arg("--")
                    .arg(&dockerd);
                c
            }
            None => Command::new(&dockerd),
        };
        cmd.arg("--data-root")
            .arg(r.join("data"))
            .arg("--exec-root")
            .arg(r.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .arg("--pidfile")
            .arg(r.join("docker.pid"))
            .args(["--bridge", BRIDGE])
            .arg("--userland-proxy-path")
            .arg(r.join("bin/docker-proxy"));
        if self.netns.is_none() {
            cmd.args(["--iptables=false", "--ip-forward=false"]);
        }
        // Docker 28 finds docker-init beside its own binary's package.
        if self.setup.engine() == Engine::V28 {
            let init = Path::new(&dockerd).with_file_name("../bin/docker-init");
            cmd.arg("--init-path").arg(init);
        }
        let child = cmd
            .env("ENVOY_DOCKER_SOCKET", &self.stack.socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run dockerd (apt-get install docker.io)");
        self.dockerd = Some(child);
        let ok = wait_until(Duration::from_secs(60), || {
            self.docker(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
        });
        assert!(ok, "dockerd did not start:\n{}", self.dockerd_log());
    }

    /// The address a client in this process uses for host port `port`:
    /// loopback for the legacy daemon, else the Docker host's address on
    /// the veth, as an outside client would.
    pub fn addr(&self, port: u16) -> SocketAddr {
        match &self.netns {
            Some(ns) => SocketAddr::new(ns.host_ip().into(), port),
            None => SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The same over IPv6.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        match &self.netns {
            Some(ns) => SocketAddr::new(ns.host_ip6().into(), port),
            None => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        }
    }

    /// Runs `f` in the Docker host's network namespace (at once for the
    /// legacy daemon, which shares this process's).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            Some(ns) => super::in_netns(&ns.name, f),
            None => f(),
        }
    }

    /// A command run in the Docker host's network namespace.
    pub fn command(&self, prog: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name))
                    .arg("--")
                    .arg(prog);
                c
            }
            None => Command::new(prog),
        }
    }

    /// SIGTERM to dockerd, as `systemctl stop docker` does; waits for it.
    pub fn stop_dockerd(&mut self) {
        if let Some(mut c) = self.dockerd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let done = wait_until(Duration::from_secs(30), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !done {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    pub fn dockerd_log(&self) -> String {
        std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default()
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        sh(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args))
    }

    /// `docker run -d ARGS`; returns the container id. A container of the
    /// test image with its own command (httpd on port 80) is also waited
    /// for until that server listens (see [`DockerEnv::wait_listening`]).
    pub fn run(&self, args: &[&str]) -> String {
        let id = run_detached(|a| self.docker(a), args, &self.stack.log());
        if args.last() == Some(&IMAGE) {
            self.wait_listening(&id);
        }
        id
    }

    /// Waits (at most 10 s) until the container's own httpd accepts on its
    /// address, port 80, reached directly, not through a published port.
    /// dockerd returns from `run`, `start` and `restart` once the
    /// container's process runs, not once it listens; on a busy machine a
    /// request sent at once can find the server not bound yet (Envoy then
    /// answers 503, Docker's DNAT or docker-proxy reset). That is the
    /// container's start, not the proxy's: the proxy and Envoy were ready
    /// before dockerd returned, and the tests go on to check that.
    pub fn wait_listening(&self, id: &str) {
        let out = self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            id,
        ]);
        let ips: Vec<std::net::IpAddr> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if ips.is_empty() {
            return;
        }
        self.within(|| {
            wait_until(Duration::from_secs(10), || {
                ips.iter().any(|ip| {
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::new(*ip, 80),
                        Duration::from_millis(500),
                    )
                    .is_ok()
                })
            })
        });
    }

    /// Where `docker port` says a container port is published, as the
    /// addresses to connect to (`0.0.0.0:X` is reached at `addr(X)`,
    /// `[::]:Y` at `addr6(Y)`, a specific host address at itself).
    ///
    /// The two families need not share a port number. Debian's dockerd
    /// 20.10 maps a random (`-P`) host port for `0.0.0.0` and for `::` one
    /// binding at a time, each from its own port mapper, and when the
    /// proxy's bind fails (say, on a port the kernel has lent to an
    /// outgoing connection) it retries that binding alone on another port
    /// (libnetwork's `drivers/bridge/port_mapping.go`, `allocatePort`:
    /// `portMapper` or `portMapperV6`, up to `maxAllocatePortAttempts`).
    /// Docker 28 and later bind both families on one port
    /// (`needSamePort` and `bindHostPorts` in
    /// `daemon/libnetwork/drivers/bridge/port_mapping_linux.go`).
    pub fn published(&self, id: &str, port: &str) -> Vec<SocketAddr> {
        let out = self.docker(&["port", id, port]);
        parse_docker_port_at(
            &String::from_utf8_lossy(&out.stdout),
            self.addr(0).ip(),
            self.addr6(0).ip(),
        )
    }

    pub fn ip_of(&self, id: &str) -> String {
        let out = self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            id,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn remove_all_containers(&self) {
        remove_all_containers(|a| self.docker(a));
    }

    fn build_image(&self) {
        let tar = image_tar(&self.root);
        import_image(&tar, |args| self.docker(args));
    }
}

/// The test image's root file system, as a tarball under `root`: busybox
/// (httpd serves /www), links for the host's /usr, a passwd file, a UDP
/// echo server, and `whoami`, which answers with its client's address.
pub fn image_tar(root: &Path) -> PathBuf {
    let rootfs = root.join("rootfs");
    for d in ["bin", "www", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("busybox (apt-get install busybox-static)");
    for applet in [
        "sh", "httpd", "sleep", "cat", "echo", "ls", "ip", "wget", "nc", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("www/index.html"), "hello from container\n").unwrap();
    // The host's /usr, mounted by `peers::container_args`, brings Python
    // and PostgreSQL; their libraries are found through these links, and
    // PostgreSQL needs its user to have a name.
    std::os::unix::fs::symlink("usr/lib", rootfs.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", rootfs.join("lib64")).unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    // A /tmp anyone may write, as on any host.
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    for (c, name) in [("udp_echo.c", "udp-echo"), ("whoami.c", "whoami")] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(c);
        let out = sh(Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(rootfs.join("bin").join(name))
            .arg(&src));
        assert!(
            out.status.success(),
            "gcc {c}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tar = root.join("rootfs.tar");
    let out = sh(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    assert!(out.status.success());
    tar
}

/// `docker run -d ARGS` through `docker`; the container id. A failure
/// shows the end of `registrar_log`.
pub fn run_detached(
    docker: impl Fn(&[&str]) -> Output,
    args: &[&str],
    registrar_log: &str,
) -> String {
    let mut all = vec!["run", "-d"];
    all.extend_from_slice(args);
    let out = docker(&all);
    assert!(
        out.status.success(),
        "docker {all:?}: {}\nregistrar log tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(registrar_log, 30)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker rm -f` of every container, through `docker`.
pub fn remove_all_containers(docker: impl Fn(&[&str]) -> Output) {
    let out = docker(&["ps", "-aq"]);
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        let _ = docker(&args);
    }
}

/// Imports the test image from `image_tar`'s tarball through `docker`.
pub fn import_image(tar: &Path, docker: impl Fn(&[&str]) -> Output) {
    let out = docker(&[
        "import",
        "-c",
        "EXPOSE 80",
        "-c",
        r#"CMD ["/bin/httpd", "-f", "-p", "80", "-h", "/www"]"#,
        tar.to_str().unwrap(),
        IMAGE,
    ]);
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl DockerEnv {
    /// Stops everything; reports whatever is left.
    fn teardown(&mut self) -> Result<(), String> {
        if self.dockerd.is_some() {
            self.remove_all_containers();
            let _ = self.docker(&["network", "prune", "-f"]);
        }
        self.stop_dockerd();
        self.stack.kill_registrar();
        self.stack.stop_envoys();
        let root = self.root.to_string_lossy().to_string();
        let ours = |root: &str| -> Vec<String> {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            let mut m: Vec<String> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(root))
                .map(str::to_string)
                .collect();
            m.reverse();
            m
        };
        // dockerd keeps the host network namespace bind-mounted under its
        // exec root after it exits; that is cleaned up here, and only what
        // survives the cleanup counts as left behind.
        for m in ours(&root) {
            let _ = sh(Command::new("umount").args(["-l", &m]));
        }
        // A namespace takes its bridge, veth and Docker's rules with it.
        match &self.netns {
            None => drop(sh(Command::new("ip").args(["link", "delete", BRIDGE]))),
            Some(ns) => drop(sh(Command::new("ip").args(["netns", "delete", &ns.name]))),
        }
        let mut left: Vec<String> = ours(&root)
            .into_iter()
            .map(|m| format!("mount {m}"))
            .collect();
        for p in procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(cmd) = p.cmdline() else { continue };
            if cmd.iter().any(|a| a.contains(&root)) {
                left.push(format!("process {} {:?}", p.pid(), cmd));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The kernel frees a namespace, and so its veth, a moment after
        // its last user is gone.
        if let Some(ns) = &self.netns {
            wait_until(Duration::from_secs(10), || {
                !sh(Command::new("ip").args(["link", "show", &ns.name]))
                    .status
                    .success()
            });
        }
        let links = sh(Command::new("ip").args(["-o", "link", "show"]));
        for l in String::from_utf8_lossy(&links.stdout).lines() {
            let ours = match &self.netns {
                None => l.contains(BRIDGE) || l.contains("veth") || l.contains(": br-"),
                Some(ns) => l.contains(&format!(": {}", ns.name)),
            };
            if ours {
                left.push(format!("interface {l}"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join("\n"))
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `docker port` output, one binding a line: `0.0.0.0:49153`, `:::49153`
/// (20.10) or `[::]:32768` (28 and later), as addresses to connect to: an
/// unspecified host address becomes its family's loopback address.
pub fn parse_docker_port(text: &str) -> Vec<SocketAddr> {
    parse_docker_port_at(text, Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into())
}

/// The same, with the unspecified host addresses reached at `v4` and `v6`.
pub fn parse_docker_port_at(text: &str, v4: IpAddr, v6: IpAddr) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let (host, port) = l.trim().rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = match host.parse().ok()? {
                IpAddr::V4(a) if a.is_unspecified() => v4,
                IpAddr::V6(a) if a.is_unspecified() => v6,
                ip => ip,
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

#[test]
fn docker_port_lines_of_20_10_and_28_read_as_loopback_addresses() {
    let v20 = parse_docker_port("0.0.0.0:49154\n:::49153\n");
    assert_eq!(
        v20,
        [
            "127.0.0.1:49154".parse().unwrap(),
            "[::1]:49153".parse().unwrap()
        ]
    );
    let v28 = parse_docker_port("0.0.0.0:32768\n[::]:32768\n");
    assert_eq!(
        v28,
        [
            "127.0.0.1:32768".parse().unwrap(),
            "[::1]:32768".parse().unwrap()
        ]
    );
    assert_eq!(
        parse_docker_port("127.0.0.2:8080\n[::1]:8081\n"),
        [
            "127.0.0.2:8080".parse().unwrap(),
            "[::1]:8081".parse().unwrap()
        ]
    );
    assert!(parse_docker_port("Error: No public port '80/tcp' published\n").is_empty());
}
