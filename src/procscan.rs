//! The /proc scan that `resync` and the registrar's start-up recovery
//! share: find every running proxy and read its mapping back from its
//! command line.
//!
//! A proxy is a process whose argv[0] basename is docker-proxy or
//! envoy-docker-shim, or that runs this binary (or one named envoy-docker)
//! as `envoy-docker proxy ...`. Only proxies whose `ENVOY_DOCKER_SOCKET`
//! (or the default, when unset) names this registrar's socket are taken,
//! so two registrars on one host never take each other's mappings.
//!
//! Only a process that root (or the registrar's own user) runs, from this
//! binary or from a configured proxy executable, is taken: anyone can start
//! a process whose argv looks like a docker-proxy, and a mapping decides
//! what root's Envoy binds and where it forwards (see [`Trust`]).

use crate::cmdline::{self, is_proxy_name, Command};
use crate::mapping::Mapping;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A running proxy and the mapping it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProxy {
    pub pid: u32,
    pub mapping: Mapping,
}

/// Reads a proxy's mapping from its argv, or `None` if it is no proxy.
pub fn proxy_mapping(argv: &[OsString], runs_this_binary: bool) -> Option<Mapping> {
    let (argv0, rest) = argv.split_first()?;
    let args = if is_proxy_name(argv0) {
        rest
    } else {
        let ours = runs_this_binary
            || Path::new(argv0)
                .file_name()
                .is_some_and(|n| n == "envoy-docker");
        match rest.split_first() {
            Some((sub, args)) if ours && sub == "proxy" => args,
            _ => return None,
        }
    };
    match cmdline::parse(args) {
        Ok(Command::Run(f)) => Some(f.mapping),
        _ => None,
    }
}

/// Which processes may own a mapping held on their behalf.
#[derive(Debug, Clone)]
pub struct Trust {
    exes: Vec<PathBuf>,
    uid: u32,
}

impl Trust {
    /// This binary, plus `extra` (`--proxy-exe`) if given.
    pub fn new(extra: Option<&Path>) -> Trust {
        let mut exes: Vec<PathBuf> = std::fs::read_link("/proc/self/exe")
            .ok()
            .into_iter()
            .collect();
        if let Some(p) = extra {
            exes.push(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
        }
        Trust {
            exes,
            uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Whether process `pid` may own mappings; the error says why not.
    pub fn admits(&self, pid: u32) -> Result<(), Untrusted> {
        let unreadable = |e: procfs::ProcError| Untrusted::Unreadable(pid, e.to_string());
        let p = procfs::process::Process::new(pid as i32).map_err(unreadable)?;
        let uid = p.uid().map_err(unreadable)?;
        if uid != 0 && uid != self.uid {
            return Err(Untrusted::NotRoot(pid, uid));
        }
        let exe = p.exe().map_err(unreadable)?;
        // A binary replaced by an upgrade reads as "PATH (deleted)".
        let shown = exe.to_string_lossy();
        let exe = PathBuf::from(shown.strip_suffix(" (deleted)").unwrap_or(&shown));
        if self.exes.contains(&exe) {
            Ok(())
        } else {
            Err(Untrusted::OtherBinary(pid, exe))
        }
    }
}

/// Why a process may not own mappings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("pid {0}: {1}")]
    Unreadable(u32, String),
    #[error("pid {0} runs as uid {1}, not as root")]
    NotRoot(u32, u32),
    #[error("pid {0} runs {path}, which is not envoy-docker (see --proxy-exe)", path = .1.display())]
    OtherBinary(u32, PathBuf),
}

/// Every trusted proxy on this host that talks to the registrar at
/// `socket`, as its `ENVOY_DOCKER_SOCKET` (or the default) says; this
/// process excluded.
pub fn scan(socket: &Path, trust: &Trust) -> Vec<FoundProxy> {
    let me = std::process::id();
    let own_exe: Option<PathBuf> = std::fs::read_link("/proc/self/exe").ok();
    let Ok(all) = procfs::process::all_processes() else {
        tracing::warn!("cannot read /proc: no proxies found");
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in all.flatten() {
        let pid = p.pid() as u32;
        if pid == me {
            continue;
        }
        let Ok(cmdline) = p.cmdline() else { continue };
        let argv: Vec<OsString> = cmdline.into_iter().map(OsString::from).collect();
        let ours = own_exe.is_some() && p.exe().ok() == own_exe;
        if let Some(mapping) = proxy_mapping(&argv, ours) {
            let theirs = p
                .environ()
                .ok()
                .and_then(|env| {
                    env.get(std::ffi::OsStr::new(crate::addr::SOCKET_ENV))
                        .cloned()
                })
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(crate::addr::DEFAULT_SOCKET));
            if theirs != socket {
                continue;
            }
            if let Err(why) = trust.admits(pid) {
                tracing::warn!("not taking {mapping}: {why}");
                continue;
            }
            if p.stat().is_ok_and(|s| s.state != 'Z') {
                found.push(FoundProxy { pid, mapping });
            }
        }
    }
    found.sort_by_key(|f| (f.mapping.key, f.pid));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    const FLAGS: [&str; 10] = [
        "-proto",
        "tcp",
        "-host-ip",
        "0.0.0.0",
        "-host-port",
        "8080",
        "-container-ip",
        "172.17.0.2",
        "-container-port",
        "80",
    ];

    #[test]
    fn recognises_every_way_a_proxy_runs() {
        let mut a = v(&["/usr/bin/docker-proxy"]);
        a.extend(v(&FLAGS));
        assert_eq!(proxy_mapping(&a, false).unwrap().key.host_port, 8080);
        let mut b = v(&["envoy-docker-shim"]);
        b.extend(v(&FLAGS));
        assert!(proxy_mapping(&b, false).is_some());
        let mut c = v(&["/opt/bin/renamed", "proxy"]);
        c.extend(v(&FLAGS));
        assert!(proxy_mapping(&c, true).is_some());
        assert!(proxy_mapping(&c, false).is_none());
        let mut d = v(&["/usr/local/bin/envoy-docker", "proxy"]);
        d.extend(v(&FLAGS));
        assert!(proxy_mapping(&d, false).is_some());
    }

    #[test]
    fn ignores_everything_else() {
        assert!(proxy_mapping(&v(&["bash", "-c", "docker-proxy"]), false).is_none());
        assert!(proxy_mapping(&v(&["envoy-docker", "serve"]), true).is_none());
        assert!(proxy_mapping(&v(&["docker-proxy", "-bogus"]), false).is_none());
        assert!(proxy_mapping(&v(&[]), false).is_none());
    }
}
