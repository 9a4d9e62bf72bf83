//! `serve --mesh`: the task that issues each wanted identity its leaf from
//! the host intermediate and renews it at a random point between 60% and
//! 90% of its life (`mesh::renew_after`), so that a fleet's hosts do not
//! all renew at once. Leaves go to the keeper, which puts them into the
//! snapshot as SDS secrets; an identity no longer wanted loses its leaf.
//! A failed issue is retried after 10 s; the old leaf stays meanwhile.

use super::keeper::{Input, Registrar};
use crate::mesh::ca::Signer;
use crate::mesh::{random_unit, renew_after};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A leaf lasts 24 h unless `--mesh-leaf-ttl` says.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_PORT: u16 = 15443;
const RETRY: Duration = Duration::from_secs(10);

/// `serve --mesh DIR [--mesh-port N] [--mesh-leaf-ttl D]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub dir: PathBuf,
    pub port: u16,
    pub leaf_ttl: Duration,
}

pub async fn run(
    signer: Signer,
    ttl: Duration,
    registrar: Registrar,
    mut wanted: watch::Receiver<BTreeSet<String>>,
    mut stop: watch::Receiver<bool>,
) {
    // Identity to when its leaf is renewed.
    let mut renew: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        renew.retain(|id, _| {
            let keep = want.contains(id);
            if !keep {
                registrar.tell(Input::MeshLeafGone(id.clone()));
            }
            keep
        });
        let now = Instant::now();
        for id in &want {
            if renew.get(id).is_some_and(|at| *at > now) {
                continue;
            }
            let next = match signer.leaf(id, ttl) {
                Ok(leaf) => {
                    let after = renew_after(ttl, random_unit());
                    tracing::info!(
                        "mesh: issued {id}, valid {}s, renewed in {}s",
                        ttl.as_secs(),
                        after.as_secs()
                    );
                    registrar.tell(Input::MeshLeaf(leaf));
                    now + after
                }
                Err(e) => {
                    tracing::warn!("mesh: cannot issue {id}: {e}; retrying in 10 s");
                    now + RETRY
                }
            };
            renew.insert(id.clone(), next);
        }
        let next = renew
            .values()
            .min()
            .copied()
            .unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
