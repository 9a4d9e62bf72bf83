//! systemd readiness: with `Type=notify`, the registrar sends `READY=1` to
//! `$NOTIFY_SOCKET` once it serves xDS, so units ordered after it (dockerd)
//! start only then. Hand-written: one datagram, nothing to pull in.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (like `READY=1`) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket, as systemd usually gives.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {path:?}: {e}");
    }
}
