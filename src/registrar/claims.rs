//! Keeps the nftables table (see `nft::ruleset`) claiming exactly the
//! ports of the mappings the registry holds. The registry only says which
//! mappings it holds, on a watch channel; this task alone runs nft.
//!
//! Who writes the table, and why it never makes a port unreachable:
//! - The registrar writes it, and claims a port only while a mapping holds
//!   it. A mapping exists only while its proxy lives, and a live proxy
//!   always has a listener on its port: its own socket, or Envoy's after a
//!   hand-over (and a proxy that lost both the registrar and Envoy takes
//!   the port back by itself, see `proxy::listening`). A port that is not
//!   claimed is served by Docker's DNAT, as with docker-proxy.
//! - At start the table is rebuilt in one transaction from the registry
//!   (which has just recovered the running proxies from /proc), so claims
//!   left by proxies that died while the registrar was down are swept.
//!   After that, each change is one transaction of element edits; changes
//!   that arrive while nft runs are batched into the next one.
//! - Every [`VERIFY_EVERY`] the table is read back; one that was deleted
//!   or edited by hand is rebuilt.
//! - A stop leaves the table as it is: the proxies and Envoy go on serving
//!   the claimed ports while the registrar is away, and the next start
//!   sweeps what went stale meanwhile.
//! - No nft, or no right to use it: said once, [`PortsState::Unclaimed`]
//!   for `status` and `/healthz`, and retried every [`VERIFY_EVERY`].
//!   Nothing else depends on it.

use crate::nft::ruleset::{self, Claims};
use crate::nft::{Nft, NftError, PortsState};
use std::time::Duration;
use tokio::sync::watch;

/// How often the table is checked against what was written.
pub const VERIFY_EVERY: Duration = Duration::from_secs(10);

/// What the task tells the registrar.
pub struct Reports {
    /// How published ports are reached, for `status` and `/healthz`.
    pub state: watch::Sender<PortsState>,
    /// What the table claims once written (`None` while nothing is
    /// claimed): hand-overs wait for their port's claim.
    pub applied: watch::Sender<Option<Claims>>,
}

/// Follows `want` until `stop` is set, reporting on `reports`.
pub async fn run(
    nft: Option<Nft>,
    mut want: watch::Receiver<Claims>,
    reports: Reports,
    mut stop: watch::Receiver<bool>,
) {
    let Reports {
        state,
        applied: written,
    } = reports;
    let Some(nft) = nft else {
        tracing::warn!(
            "not claiming published ports (--nft none): where Docker's iptables is on, \
             its DNAT sends published traffic straight to the containers, past Envoy"
        );
        state.send_replace(PortsState::Off);
        return;
    };
    // What the table holds, as far as we know; `None` until it is known
    // to be ours and whole.
    let mut applied: Option<Claims> = None;
    let mut failing = false;
    let mut verify = tokio::time::interval(VERIFY_EVERY);
    verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    verify.tick().await;
    loop {
        let desired = want.borrow_and_update().clone();
        match bring(&nft, applied.as_ref(), &desired).await {
            Ok(()) => {
                if failing || applied.is_none() {
                    tracing::info!(
                        "claimed {} published port binding(s) in nftables (table inet {})",
                        desired.len(),
                        ruleset::TABLE
                    );
                }
                failing = false;
                state.send_replace(PortsState::Claimed {
                    ports: desired.len(),
                });
                written.send_replace(Some(desired.clone()));
                applied = Some(desired);
            }
            Err(e) => {
                if !failing {
                    let hint = if e.is_permission() {
                        " (the registrar needs CAP_NET_ADMIN)"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        "cannot claim published ports in nftables: {e}{hint}; where Docker's \
                         iptables is on, its DNAT sends published traffic straight to the \
                         containers, past Envoy. Retrying every {VERIFY_EVERY:?}"
                    );
                }
                failing = true;
                state.send_replace(PortsState::Unclaimed { why: e.to_string() });
                written.send_replace(None);
                applied = None;
            }
        }
        tokio::select! {
            r = want.changed() => if r.is_err() { return },
            _ = verify.tick() => {
                if let Some(held) = &applied {
                    if !still_there(&nft, held).await {
                        applied = None;
                    }
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Makes the table claim `desired`, by element edits when the table is
/// known, else (or if the edits fail) by a rebuild.
async fn bring(nft: &Nft, applied: Option<&Claims>, desired: &Claims) -> Result<(), NftError> {
    if let Some(held) = applied {
        let Some(batch) = ruleset::change(held, desired) else {
            return Ok(());
        };
        match nft.apply(&batch).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!("editing the nftables table failed ({e}); rebuilding it"),
        }
    }
    nft.apply(&ruleset::rebuild(desired)).await
}

/// Reads the table back: true if it holds what was written.
async fn still_there(nft: &Nft, held: &Claims) -> bool {
    match nft.list().await {
        Ok(Some(l)) if l.intact && &l.claims == held => true,
        Ok(Some(_)) => {
            tracing::warn!(
                "the nftables table inet {} was changed by hand; rebuilding it",
                ruleset::TABLE
            );
            false
        }
        Ok(None) => {
            tracing::warn!(
                "the nftables table inet {} is gone; rebuilding it",
                ruleset::TABLE
            );
            false
        }
        // Reading failed: the next change or check tries again.
        Err(e) => {
            tracing::warn!("cannot read the nftables table back: {e}");
            false
        }
    }
}
