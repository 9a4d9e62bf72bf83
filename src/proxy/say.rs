//! Where the proxy's own messages go. dockerd gives a proxy no stdout or
//! stderr worth the name (it discards them), so every line goes to stderr
//! and also to `$ENVOY_DOCKER_PROXY_LOG` (a file, appended) when that is
//! set, else to syslog on `/dev/log`, which journald serves:
//! `journalctl -t envoy-docker-proxy`.

use std::io::Write;
use std::os::unix::net::UnixDatagram;

/// Names a file that gets the proxies' messages instead of syslog.
pub const LOG_ENV: &str = "ENVOY_DOCKER_PROXY_LOG";
const SYSLOG: &str = "/dev/log";
/// syslog's daemon facility (3) at warning severity (4).
const PRIORITY: u8 = 3 * 8 + 4;

/// Logs one line, prefixed with the pid.
pub fn say(msg: &str) {
    let pid = std::process::id();
    eprintln!("envoy-docker proxy: {msg}");
    if let Some(path) = std::env::var_os(LOG_ENV).filter(|p| !p.is_empty()) {
        // One write per line with O_APPEND: lines from many proxies do not
        // interleave.
        let line = format!("envoy-docker-proxy[{pid}]: {msg}\n");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
        return;
    }
    if let Ok(sock) = UnixDatagram::unbound() {
        let line = format!("<{PRIORITY}>envoy-docker-proxy[{pid}]: {msg}");
        let _ = sock.send_to(line.as_bytes(), SYSLOG);
    }
}
