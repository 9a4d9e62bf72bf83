//! Owner liveness for mappings held on a process's behalf (recovered at
//! start-up or replayed by `resync`, so with no connection to watch): a
//! pidfd per owner, which turns readable when the process exits. No /proc
//! rescans, so nothing here fails or costs more as mappings grow.

use crate::mapping::MappingKey;
use std::os::fd::{FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

/// The process that keeps a mapping alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerProcess {
    pub pid: u32,
    /// Start time from /proc/PID/stat, so a reused pid is not mistaken for
    /// the owner. `None` if /proc could not tell.
    pub start: Option<u64>,
}

impl OwnerProcess {
    pub fn of(pid: u32) -> OwnerProcess {
        OwnerProcess {
            pid,
            start: proc_start(pid),
        }
    }

    /// False only when /proc says the process is gone (or a zombie, or
    /// another process under a reused pid). Any other trouble reading /proc
    /// (out of descriptors, say) counts as alive: a mapping must never be
    /// dropped because the registrar itself is short of something.
    pub fn alive(&self) -> bool {
        use procfs::ProcError;
        let stat = match procfs::process::Process::new(self.pid as i32).and_then(|p| p.stat()) {
            Ok(stat) => stat,
            Err(ProcError::NotFound(_)) => return false,
            Err(ProcError::Io(e, _)) if e.raw_os_error() == Some(nix::libc::ESRCH) => return false,
            Err(_) => return true,
        };
        // A killed proxy stays a zombie until its parent reaps it; it serves
        // nothing any more.
        stat.state != 'Z' && self.start.is_none_or(|s| s == stat.starttime)
    }
}

fn proc_start(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

/// Where exits are reported: the mapping and the owner that held it.
pub type Exits = mpsc::UnboundedSender<(MappingKey, OwnerProcess)>;

/// Reports `owner`'s exit on `exits`. Needs a tokio runtime; without one
/// (unit tests) or without pidfds (Linux before 5.3), nothing is watched
/// and the registrar's slow /proc check remains.
pub fn watch(key: MappingKey, owner: OwnerProcess, exits: &Exits) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let fd = match pidfd_open(owner.pid) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!("pidfd_open({}): {e}", owner.pid);
            return;
        }
    };
    // The pid may have been reused between the caller's look and now.
    if !owner.alive() {
        let _ = exits.send((key, owner));
        return;
    }
    let exits = exits.clone();
    rt.spawn(async move {
        // SAFETY: `fd` is an open pidfd that the AsyncFd owns from here on,
        // so it stays open and the same for the AsyncFd's whole life.
        let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
            return;
        };
        if fd.readable().await.is_ok() {
            let _ = exits.send((key, owner));
        }
    });
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Proto;

    #[tokio::test]
    async fn an_exit_is_reported_once_the_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let owner = OwnerProcess::of(child.id());
        let key = MappingKey {
            proto: Proto::Tcp,
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: 1,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        watch(key, owner, &tx);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got, Some((key, owner)));
        let _ = child.wait();
    }
}
