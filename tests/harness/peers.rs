//! Real servers and clients for the transparency tests: the small peers of
//! `tests/fixtures/peers.py` (raw HTTP, banner, PROXY protocol, idle, gRPC),
//! `openssl s_server`, and Debian's PostgreSQL, on loopback or inside a
//! container of the test dockerd.
//!
//! A busybox container runs the host's own Python or PostgreSQL: the test
//! image links `/lib` into `/usr`, and `container_args` mounts the host's
//! `/usr` read-only plus the fixtures at `/peers`.

use super::{wait_until, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peers.py")
}

/// One `peers.py` server, killed on drop.
pub struct Peer {
    child: Child,
    pub port: u16,
}

impl Peer {
    /// Starts `python3 peers.py ARGS` and waits for its `listening PORT`.
    pub fn start(args: &[&str]) -> Peer {
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("peers.py {args:?} said {line:?}"));
        Peer { child, port }
    }

    pub fn addr(&self, ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), self.port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `docker run` flags that give a busybox container the host's `/usr`
/// (Python, PostgreSQL) and the fixtures at `/peers`, read-only.
pub fn container_args() -> Vec<String> {
    let fixtures = script().parent().unwrap().display().to_string();
    vec![
        "-v".into(),
        "/usr:/usr:ro".into(),
        "-v".into(),
        format!("{fixtures}:/peers:ro"),
    ]
}

/// A TCP connection from a chosen loopback address, so that the backend
/// can tell the client's address from Envoy's own.
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &nix::sys::socket::SockaddrStorage::from(local),
    )
    .unwrap();
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &nix::sys::socket::SockaddrStorage::from(to),
    )
    .unwrap();
    let s = TcpStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `request` and reads until the server closes.
pub fn exchange(mut s: TcpStream, request: &[u8]) -> String {
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

/// A command's stdout, asserting success.
pub fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_of(path: &Path) -> String {
    output(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A self-signed certificate and key in `dir`, made by openssl.
pub fn self_signed(dir: &TempDir) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    output(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=envoy-docker-test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()),
    );
    (cert, key)
}

/// `openssl s_server` on `addr` with that certificate, killed on drop.
pub struct TlsServer(Child);

impl TlsServer {
    pub fn start(addr: SocketAddr, cert: &Path, key: &Path) -> TlsServer {
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www"])
            .arg("-accept")
            .arg(addr.to_string())
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl");
        assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
            addr
        )
        .is_ok()));
        TlsServer(child)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The certificate a TLS server at `addr` presents, as PEM, by
/// `openssl s_client`.
pub fn presented_cert(addr: SocketAddr) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-showcerts"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let from = text
        .find(begin)
        .unwrap_or_else(|| panic!("no certificate from {addr}: {text}"));
    let to = text[from..].find(end).unwrap() + from + end.len();
    text[from..to].to_string()
}

/// The directory of Debian's PostgreSQL server binaries.
pub fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (apt-get install postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql")
}

/// The shell commands that make a fresh cluster in `data` and run it on
/// `listen:port`, trusting every client, with its socket in `data`.
pub fn postgres_script(bin: &Path, data: &str, listen: &str, port: u16) -> String {
    let bin = bin.display();
    format!(
        "{bin}/initdb -D {data} -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null \
         && echo 'host all all 0.0.0.0/0 trust' >> {data}/pg_hba.conf \
         && exec {bin}/postgres -D {data} -p {port} -k {data} -c listen_addresses='{listen}' \
            -c fsync=off"
    )
}

/// Debian's PostgreSQL on `ip` as user postgres, in `dir`; killed on drop.
pub struct Postgres {
    child: Child,
    pub addr: SocketAddr,
}

impl Postgres {
    pub fn start(dir: &TempDir, ip: &str) -> Postgres {
        let data = dir.path("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        output(Command::new("chown").arg("postgres:postgres").arg(&data));
        let port = super::free_port();
        let script = postgres_script(&postgres_bin(), &data.display().to_string(), ip, port);
        // setpriv execs (runuser would fork), so the child is PostgreSQL.
        let child = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("postgres.log")).unwrap())
            .spawn()
            .unwrap();
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        let pg = Postgres { child, addr };
        assert!(
            wait_until(Duration::from_secs(60), || psql(addr, "select 1").is_ok()),
            "PostgreSQL did not start on {addr}"
        );
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown, which ends its children too.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

/// Runs one query with `psql` against `addr`; its output, trimmed.
pub fn psql(addr: SocketAddr, query: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-c", query,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
