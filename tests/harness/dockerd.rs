//! A private Docker daemon for the end-to-end tests: Debian's dockerd with
//! its own data root, exec root, socket, pidfile and bridge, iptables off,
//! and `--userland-proxy-path` pointing at a `docker-proxy` symlink to the
//! freshly built binary. A registrar (following this dockerd) and a real
//! Envoy come with it.
//!
//! One daemon serves the whole test binary; its tests take turns through a
//! mutex. It is torn down when the process exits, and the teardown checks
//! that no mount, interface or process is left behind.

use super::{bin, wait_until, Ads, Stack};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub const IMAGE: &str = "envoy-docker-test:busybox";
const BRIDGE: &str = "edtest0";
const BRIDGE_CIDR: &str = "172.29.7.1/24";
/// The host's address on that bridge.
pub const GATEWAY: &str = "172.29.7.1";

pub struct DockerEnv {
    pub root: PathBuf,
    pub stack: Stack,
    pub sock: PathBuf,
    dockerd: Option<Child>,
}

static ENV: OnceLock<Mutex<DockerEnv>> = OnceLock::new();

/// The shared daemon, started on first use; holding the guard gives a test
/// the daemon to itself.
pub fn shared() -> MutexGuard<'static, DockerEnv> {
    let env = ENV.get_or_init(|| {
        let env = DockerEnv::start();
        // SAFETY: registers a plain extern "C" function; it runs once at exit.
        unsafe { nix::libc::atexit(teardown_at_exit) };
        Mutex::new(env)
    });
    let guard = env.lock().unwrap_or_else(|p| p.into_inner());
    guard.remove_all_containers();
    guard
}

extern "C" fn teardown_at_exit() {
    if let Some(env) = ENV.get() {
        let mut env = env.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(leftovers) = env.teardown() {
            eprintln!("dockerd teardown left things behind:\n{leftovers}");
            // SAFETY: ending the process with a failure status at exit.
            unsafe { nix::libc::_exit(1) };
        }
    }
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

impl DockerEnv {
    fn start() -> DockerEnv {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the dockerd tests need root"
        );
        let root = PathBuf::from(format!("/tmp/ed-dockerd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::os::unix::fs::symlink(bin(), root.join("bin/docker-proxy")).unwrap();
        let sock = root.join("docker.sock");

        let _ = sh(Command::new("ip").args(["link", "delete", BRIDGE]));
        for args in [
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", BRIDGE_CIDR, "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            let out = sh(Command::new("ip").args(&args));
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let stack = Stack::start_with(
            Ads::Sotw,
            &["--docker", &format!("unix://{}", sock.display())],
        );
        let mut env = DockerEnv {
            root,
            stack,
            sock,
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
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(r.join("data"))
            .arg("--exec-root")
            .arg(r.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .arg("--pidfile")
            .arg(r.join("docker.pid"))
            .args(["--iptables=false", "--ip-forward=false", "--bridge", BRIDGE])
            .arg("--userland-proxy-path")
            .arg(r.join("bin/docker-proxy"))
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

    /// `docker run -d ARGS`; returns the container id.
    pub fn run(&self, args: &[&str]) -> String {
        run_detached(|a| self.docker(a), args, &self.stack.log())
    }

    /// Where `docker port` says a container port is published, as the
    /// addresses to connect to (`0.0.0.0:X` is reached at 127.0.0.1:X,
    /// `[::]:Y` at [::1]:Y, a specific host address at itself).
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
        parse_docker_port(&String::from_utf8_lossy(&out.stdout))
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
/// echo server.
pub fn image_tar(root: &Path) -> PathBuf {
    let rootfs = root.join("rootfs");
    for d in ["bin", "www", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("busybox (apt-get install busybox-static)");
    for applet in ["sh", "httpd", "sleep", "cat", "echo", "ls", "ip"] {
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
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/udp_echo.c");
    let out = sh(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("bin/udp-echo"))
        .arg(&src));
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        let _ = sh(Command::new("ip").args(["link", "delete", BRIDGE]));
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
        let links = sh(Command::new("ip").args(["-o", "link", "show"]));
        for l in String::from_utf8_lossy(&links.stdout).lines() {
            if l.contains(BRIDGE) || l.contains("veth") || l.contains(": br-") {
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
    let mut addrs: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let (host, port) = l.trim().rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = match host.parse().ok()? {
                IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
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
