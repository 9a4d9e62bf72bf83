//! Spawning the proxy role as dockerd does: argv[0] `docker-proxy`, the
//! write end of a pipe on fd 3, optionally a pre-bound socket on fd 4, and
//! the registrar socket from `ENVOY_DOCKER_SOCKET`.
//!
//! With a socket on fd 4 this follows moby's `StartProxy`
//! (daemon/libnetwork/portmapper/proxy_linux.go, v28.0.0 to v29.x): the
//! daemon reads two bytes from the pipe; on `0\n` it returns and its caller
//! closes the daemon's copy of the socket; otherwise it reads the rest as
//! the error, and the copy is closed when the port is unmapped. It gives up
//! after 16 s. Until then the daemon's copy stays open and listening.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct ProxySpec {
    pub args: Vec<String>,
    /// A socket to pass as fd 4 (with `-use-listen-fd` in `args`).
    pub listen_fd: Option<OwnedFd>,
    /// Run as this uid instead of root.
    pub uid: Option<u32>,
    /// Start it as Docker 29.5+ does: `nsenter -n<netns> -F -- <path> <flags>`.
    pub nsenter: bool,
    /// Extra environment for the proxy.
    pub env: Vec<(String, String)>,
}

impl ProxySpec {
    /// The flags dockerd passes for one mapping.
    pub fn mapping(proto: &str, host_ip: &str, host_port: u16, ip: &str, port: u16) -> ProxySpec {
        ProxySpec {
            args: vec![
                "-proto".into(),
                proto.into(),
                "-host-ip".into(),
                host_ip.into(),
                "-host-port".into(),
                host_port.to_string(),
                "-container-ip".into(),
                ip.into(),
                "-container-port".into(),
                port.to_string(),
            ],
            ..Default::default()
        }
    }

    /// As Docker `version` (28 or 29) starts it: dockerd binds the host
    /// socket first ([`docker_socket`]) and passes it as fd 4 with
    /// `-use-listen-fd`; from 29.5 on, through nsenter.
    pub fn docker(mut self, version: u32, nsenter: bool) -> ProxySpec {
        let flag = |name: &str| {
            let i = self.args.iter().position(|a| a == name).unwrap();
            self.args[i + 1].clone()
        };
        let ip: std::net::IpAddr = flag("-host-ip").parse().unwrap();
        let port: u16 = flag("-host-port").parse().unwrap();
        let fd = docker_socket(
            &flag("-proto"),
            std::net::SocketAddr::new(ip, port),
            version,
        );
        self.args.push("-use-listen-fd".into());
        self.listen_fd = Some(fd);
        self.nsenter = nsenter;
        self
    }

    pub fn tcp(host_ip: &str, host_port: u16, backend: std::net::SocketAddr) -> ProxySpec {
        ProxySpec::mapping(
            "tcp",
            host_ip,
            host_port,
            &backend.ip().to_string(),
            backend.port(),
        )
    }
}

pub struct Proxy {
    pub child: Child,
    status: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Set once the daemon's copy of fd 4 is closed (at once without one).
    pub parent_copy_closed: mpsc::Receiver<()>,
}

impl Proxy {
    pub fn spawn(socket: &Path, spec: ProxySpec) -> Proxy {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let write_raw = write.as_raw_fd();
        let listen_raw = spec.listen_fd.as_ref().map(|f| f.as_raw_fd());
        let mut cmd = if spec.nsenter {
            // The daemon's own network namespace, named by path as moby does.
            let path = proxy_link(socket);
            let mut c = Command::new("nsenter");
            c.arg("-n/proc/self/ns/net").args(["-F", "--"]).arg(path);
            c
        } else {
            let mut c = Command::new(super::bin());
            c.arg0("docker-proxy");
            c
        };
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("ENVOY_DOCKER_SOCKET", socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(uid) = spec.uid {
            cmd.uid(uid).gid(uid);
        }
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec. Both descriptors are first moved above 100, so that
        // placing one on 3 or 4 cannot clobber the other.
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc::{dup2, fcntl, F_DUPFD_CLOEXEC};
                let high = |fd: i32| {
                    let n = fcntl(fd, F_DUPFD_CLOEXEC, 100);
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n)
                    }
                };
                let status = high(write_raw)?;
                let listen = listen_raw.map(high).transpose()?;
                if dup2(status, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = listen {
                    if dup2(fd, 4) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        // Like dockerd: the write end of the pipe closes at once; the copy
        // of fd 4 stays open until the proxy has reported.
        drop(write);
        let parent_copy = spec.listen_fd;
        let (tx, status) = mpsc::channel();
        let (closed_tx, parent_copy_closed) = mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(read);
            let mut first = [0u8; 2];
            let mut got = 0;
            while got < 2 {
                match f.read(&mut first[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            let mut s = String::from_utf8_lossy(&first[..got]).into_owned();
            if s != "0\n" {
                let mut rest = String::new();
                let _ = f.read_to_string(&mut rest);
                s.push_str(&rest);
            }
            // StartProxy has returned (or failed): its caller closes the
            // daemon's copy of the socket now.
            drop(parent_copy);
            let _ = closed_tx.send(());
            let _ = tx.send(s);
        });
        let mut err = child.stderr.take().unwrap();
        let (etx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Proxy {
            child,
            status,
            stderr,
            parent_copy_closed,
        }
    }

    /// What the proxy wrote on fd 3, read to EOF, as dockerd reads it.
    pub fn status(&self) -> String {
        self.status
            .recv_timeout(Duration::from_secs(16))
            .expect("the proxy reported nothing on fd 3 within dockerd's 16 s")
    }

    /// Asserts the proxy reported ready.
    pub fn ready(self) -> Proxy {
        let s = self.status();
        assert_eq!(s, "0\n", "proxy reported {s:?}");
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the proxy wrote on stderr (after it exited).
    pub fn stderr(&self) -> String {
        self.stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A symlink named `docker-proxy` to the binary, next to the registrar
/// socket, as an operator points `--userland-proxy-path` at it.
fn proxy_link(socket: &Path) -> std::path::PathBuf {
    let dir = socket.parent().unwrap_or(Path::new("/tmp"));
    std::fs::create_dir_all(dir).unwrap();
    let link = dir.join("docker-proxy");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(super::bin(), &link).unwrap();
    }
    link
}

/// The host socket as dockerd 28/29 makes it before it starts the proxy,
/// read in moby's source (v28.0.0 to v29.x; see
/// ../shared/reference/docker-proxy-contract.md):
/// - TCP: `socket(SOCK_STREAM | SOCK_CLOEXEC)`, `SO_REUSEADDR = 1`,
///   `IPV6_V6ONLY = 1` for IPv6, `bind`, `listen(fd, -1)`; never
///   `SO_REUSEPORT`;
/// - UDP: the same without `listen`, plus `IP_PKTINFO` or
///   `IPV6_RECVPKTINFO`; v28 sets `SO_REUSEADDR` and v29 does not; v29
///   attaches a drop-all cBPF filter before `bind` and detaches it just
///   before starting the proxy.
pub fn docker_socket(proto: &str, addr: std::net::SocketAddr, version: u32) -> OwnedFd {
    use nix::libc;
    use std::os::fd::FromRawFd;
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let tcp = proto == "tcp";
    let kind = if tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let one: libc::c_int = 1;
    let opt = |fd: i32, level: i32, name: i32| {
        // SAFETY: a plain int option on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(
            r,
            0,
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        );
    };
    // SAFETY: socket(2) returns a new descriptor that we then own.
    let raw = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: raw is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if tcp || version < 29 {
        opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR);
    }
    if addr.is_ipv6() {
        opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
    }
    if !tcp {
        if addr.is_ipv6() {
            opt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO);
        } else {
            opt(raw, libc::IPPROTO_IP, libc::IP_PKTINFO);
        }
    }
    let drop_all = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_ptr() as *mut _,
    };
    if !tcp && version >= 29 {
        // SAFETY: a valid one-instruction classic BPF program.
        let r = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                &prog as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        assert_eq!(r, 0);
    }
    let sa = nix::sys::socket::SockaddrStorage::from(addr);
    nix::sys::socket::bind(raw, &sa).expect("bind as dockerd does");
    if tcp {
        // SAFETY: listen(2) on our socket; -1 means the kernel's maximum.
        assert_eq!(unsafe { libc::listen(raw, -1) }, 0);
    }
    if !tcp && version >= 29 {
        // Detaching ignores the value, but the kernel wants an int.
        opt(raw, libc::SOL_SOCKET, libc::SO_DETACH_FILTER);
    }
    fd
}
