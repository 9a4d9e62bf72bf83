//! Owner liveness for mappings held on a process's behalf (recovered at
//! start-up or replayed by `resync`, so with no connection to watch): a
//! pidfd per owner, which turns readable when the process exits. No /proc
//! rescans, so nothing here fails or costs more as mappings grow.

use std::os::fd::{FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

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

/// Resolves once `owner` has exited. Without pidfds (Linux before 5.3)
/// it never resolves, and the registrar's slow /proc check remains. The
/// caller holds the future (in a `JoinSet`), so watches end with it.
pub async fn exited(owner: OwnerProcess) {
    let fd = match pidfd_open(owner.pid) {
        Ok(fd) => fd,
        // Gone (and reaped) before we looked.
        Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => return,
        Err(e) => {
            tracing::debug!("pidfd_open({}): {e}", owner.pid);
            return std::future::pending().await;
        }
    };
    // The pid may have been reused between the caller's look and now.
    if !owner.alive() {
        return;
    }
    // SAFETY: `fd` is an open pidfd that the AsyncFd owns from here on, so
    // it stays open and the same for the AsyncFd's whole life.
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
        return std::future::pending().await;
    };
    if fd.readable().await.is_err() {
        std::future::pending::<()>().await;
    }
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

    #[tokio::test]
    async fn an_exit_is_seen_once_the_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let owner = OwnerProcess::of(child.id());
        // The child exits by itself; the watch sees it, zombie or not.
        tokio::time::timeout(std::time::Duration::from_secs(5), exited(owner))
            .await
            .expect("the exit was not seen");
        // Reaped before the watch begins: seen at once.
        let _ = child.wait();
        tokio::time::timeout(std::time::Duration::from_secs(5), exited(owner))
            .await
            .expect("a reaped process was not seen as gone");
    }
}
