//! Spawning the proxy role as dockerd does: argv[0] `docker-proxy`, the
//! write end of a pipe on fd 3, optionally a pre-bound socket on fd 4, and
//! the registrar socket from `ENVOY_DOCKER_SOCKET`.

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
}

impl Proxy {
    pub fn spawn(socket: &Path, spec: ProxySpec) -> Proxy {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let write_raw = write.as_raw_fd();
        let listen_raw = spec.listen_fd.as_ref().map(|f| f.as_raw_fd());
        let mut cmd = Command::new(super::bin());
        cmd.arg0("docker-proxy")
            .args(&spec.args)
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
        // Like dockerd: our copies of the pipe and of fd 4 close at once.
        drop(write);
        drop(spec.listen_fd);
        let (tx, status) = mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(read);
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
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
