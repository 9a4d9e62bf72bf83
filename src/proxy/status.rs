//! The readiness pipe on fd 3, exactly as docker-proxy uses it: `0\n` when
//! the port is served, `1\n<error>` when it cannot be. dockerd reads it
//! before the container starts; a person running the proxy by hand has no
//! fd 3, and then reports go nowhere.

use crate::proxy::say::say;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

const STATUS_FD: i32 = 3;

#[derive(Debug)]
pub struct StatusPipe(Option<File>);

impl StatusPipe {
    /// Takes fd 3 if it is open. Must run before anything else opens a
    /// descriptor, or that descriptor could be mistaken for the pipe.
    pub fn take() -> StatusPipe {
        // SAFETY: F_GETFD only asks whether the descriptor exists.
        let open = unsafe { nix::libc::fcntl(STATUS_FD, nix::libc::F_GETFD) } != -1;
        if !open {
            return StatusPipe(None);
        }
        // SAFETY: fd 3 is open, and nothing else in this process owns it:
        // dockerd hands it to the proxy for exactly this purpose.
        StatusPipe(Some(unsafe { File::from_raw_fd(STATUS_FD) }))
    }

    /// Reports success and closes the pipe.
    pub fn ready(&mut self) {
        self.send(b"0\n".to_vec());
    }

    /// Reports a failure and closes the pipe. The message is also logged to
    /// stderr, on one line.
    pub fn fail(&mut self, msg: &str) {
        say(msg);
        let mut out = b"1\n".to_vec();
        out.extend_from_slice(msg.as_bytes());
        self.send(out);
    }

    fn send(&mut self, bytes: Vec<u8>) {
        if let Some(mut f) = self.0.take() {
            // dockerd may have given up already; nothing more to do then.
            let _ = f.write_all(&bytes);
        }
    }
}
