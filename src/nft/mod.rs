//! Claiming published ports in nftables, so that Docker's own DNAT (with
//! `iptables: true`, its default) cannot send their traffic past the proxy
//! and Envoy. `ruleset` builds and reads the table (pure); [`Nft`] runs
//! Debian's `nft` command with JSON in and out.
//!
//! Why the `nft` command and not a netlink library: one `nft -j -f -` is
//! one kernel transaction, whole or nothing, and nft knows how to encode
//! every expression for the running kernel; the pure-Rust netlink crates
//! would have us encode `fib`, `redirect` and concatenated sets by hand.
//! The static binary stays free of C libraries; a host without nft gets a
//! clear error at start, and its ports stay with Docker's DNAT.
//!
//! [`PortsState`] is how published ports are reached, as `status` and
//! `/healthz` show it.

pub mod ruleset;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The command looked up on PATH unless `serve --nft` names another.
pub const DEFAULT_NFT: &str = "nft";
/// How long one nft run may take.
const RUN_WITHIN: Duration = Duration::from_secs(10);

/// Why nft could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{0} is not installed (Debian: apt-get install nftables)")]
    Missing(PathBuf),
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nft refused: {0}")]
    Refused(String),
    #[error("nft took over {RUN_WITHIN:?}")]
    Hung,
    #[error("nft answered what we cannot read: {0}")]
    BadOutput(String),
}

impl NftError {
    /// The kernel said no for lack of rights (no CAP_NET_ADMIN).
    pub fn is_permission(&self) -> bool {
        matches!(self, NftError::Refused(t) if t.contains("Operation not permitted"))
    }
}

/// How published ports are reached on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortsState {
    /// The registrar has not written the table yet.
    Starting,
    /// Claimed in the table: published traffic reaches the proxies and
    /// Envoy, whatever Docker's firewall does.
    Claimed { ports: usize },
    /// Not claimed: with Docker's iptables on, its DNAT sends published
    /// traffic straight to the containers, past Envoy.
    Unclaimed { why: String },
    /// `serve --nft none`.
    Off,
}

impl PortsState {
    pub fn claimed(&self) -> bool {
        matches!(self, PortsState::Claimed { .. })
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let table = format!("table inet {}", ruleset::TABLE);
        match self {
            PortsState::Starting => "not claimed yet (starting)".into(),
            PortsState::Claimed { ports } => format!(
                "claimed in nftables ({table}, {ports} binding(s)): published traffic reaches the proxies and Envoy"
            ),
            PortsState::Unclaimed { why } => format!(
                "NOT claimed ({why}): where Docker's iptables is on, its DNAT sends published traffic straight to the containers, past Envoy"
            ),
            PortsState::Off => "not claimed (serve --nft none): where Docker's iptables is on, its DNAT sends published traffic straight to the containers, past Envoy".into(),
        }
    }
}

/// The `nft` command.
#[derive(Debug, Clone)]
pub struct Nft {
    path: PathBuf,
}

impl Nft {
    pub fn new(path: impl Into<PathBuf>) -> Nft {
        Nft { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one batch of nft JSON commands as one transaction.
    pub async fn apply(&self, batch: &serde_json::Value) -> Result<(), NftError> {
        self.run(&["-j", "-f", "-"], Some(batch.to_string()))
            .await?;
        Ok(())
    }

    /// The table as it is now; `None` if there is none.
    pub async fn list(&self) -> Result<Option<ruleset::Listing>, NftError> {
        let table = ["-j", "list", "table", "inet", ruleset::TABLE];
        let out = match self.run(&table, None).await {
            Ok(out) => out,
            Err(NftError::Refused(t)) if t.contains("No such file or directory") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let doc: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| NftError::BadOutput(e.to_string()))?;
        ruleset::parse_listing(&doc)
            .map(Some)
            .map_err(|e| NftError::BadOutput(e.to_string()))
    }

    async fn run(&self, args: &[&str], input: Option<String>) -> Result<String, NftError> {
        let mut cmd = tokio::process::Command::new(&self.path);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NftError::Missing(self.path.clone()),
            _ => NftError::Spawn {
                path: self.path.clone(),
                source: e,
            },
        })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // A write error shows up as nft's own failure below.
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        let out = tokio::time::timeout(RUN_WITHIN, child.wait_with_output())
            .await
            .map_err(|_| NftError::Hung)?
            .map_err(|e| NftError::Spawn {
                path: self.path.clone(),
                source: e,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Err(NftError::Refused(format!(
                "{} ({})",
                first.trim(),
                out.status
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nft_is_named_with_its_package() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(Nft::new("/nonexistent/nft").list())
            .unwrap_err();
        assert!(matches!(err, NftError::Missing(_)));
        assert!(err.to_string().contains("apt-get install nftables"));
    }

    #[test]
    fn states_say_whether_docker_dnat_is_in_front() {
        assert!(PortsState::Claimed { ports: 2 }.claimed());
        let off = PortsState::Unclaimed {
            why: "nft is not installed".into(),
        };
        assert!(!off.claimed());
        assert!(off.describe().contains("past Envoy"));
        assert!(PortsState::Off.describe().contains("--nft none"));
    }
}
