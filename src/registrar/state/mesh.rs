//! The registry's side of the mesh (`serve --mesh`): which identities
//! this host needs leaves for, who the local callers are, what the mesh
//! ingress serves, and the leaves as issued. `registrar::mesh` issues and
//! renews the leaves; this module does no I/O.
//!
//! - Identities: the host's own, every local service's (instances of the
//!   catalog), and every local caller's (a running container that names
//!   its own service with `ServiceName` or Compose's label).
//! - `MeshAllow` items become SPIFFE ids: `host:<id>` a host's, any other
//!   name a service's.

use super::containers::Containers;
use super::fleet::LocalFleet;
use crate::mapping::sanitize;
use crate::xds::mesh::{Ingress, Mesh, MeshEgress};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;
use tokio::sync::watch;

/// What is known of one identity's current leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafState {
    pub not_after: SystemTime,
    /// Leaves issued to it since start; the first is not a rotation.
    pub issued: u64,
}

#[derive(Debug)]
pub(super) struct LocalMesh {
    pub mesh: Mesh,
    pub host_id: String,
    wanted: watch::Sender<BTreeSet<String>>,
    pub leaves: BTreeMap<String, LeafState>,
}

/// The SPIFFE ids a `MeshAllow` label allows.
pub fn allowed(mesh: &Mesh, label: &str) -> Vec<String> {
    let td = &mesh.trust_domain;
    let mut out: Vec<String> = label
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.strip_prefix("host:") {
            Some(h) => td.host(h.trim()),
            None => td.service(&sanitize(item)),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl LocalMesh {
    pub fn new(mesh: Mesh, host_id: String) -> LocalMesh {
        let (wanted, _) = watch::channel(BTreeSet::new());
        LocalMesh {
            mesh,
            host_id,
            wanted,
            leaves: BTreeMap::new(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<String>> {
        self.wanted.subscribe()
    }

    /// Local callers with an identity of their own: service to addresses.
    pub fn callers(containers: &Containers) -> BTreeMap<String, Vec<IpAddr>> {
        let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for c in containers.all() {
            if let Some(s) = c.own_service() {
                out.entry(s).or_default().extend(c.ips.iter().copied());
            }
        }
        for ips in out.values_mut() {
            ips.sort();
            ips.dedup();
        }
        out
    }

    /// The ingress's services, from this host's catalog instances.
    pub fn ingress(&self, fleet: &LocalFleet) -> Vec<Ingress> {
        let mut by: BTreeMap<String, Ingress> = BTreeMap::new();
        for l in fleet.locals() {
            let i = by
                .entry(l.instance.service.clone())
                .or_insert_with(|| Ingress {
                    service: l.instance.service.clone(),
                    mode: l.instance.mode,
                    backends: Vec::new(),
                    allow: None,
                });
            i.backends.push(l.backend);
            if let Some(label) = &l.allow {
                // Instances that disagree: the union of what they allow.
                let mut all = i.allow.take().unwrap_or_default();
                all.extend(allowed(&self.mesh, label));
                all.sort();
                all.dedup();
                i.allow = Some(all);
            }
        }
        let mut out: Vec<Ingress> = by.into_values().collect();
        for i in &mut out {
            i.backends.sort();
            i.backends.dedup();
        }
        out
    }

    /// Brings the wanted identities up to date with the ingress's services
    /// and the callers; the egress view of the mesh.
    pub fn update(
        &mut self,
        ingress: &[Ingress],
        callers: BTreeMap<String, Vec<IpAddr>>,
    ) -> MeshEgress {
        let td = &self.mesh.trust_domain;
        let mut want: BTreeSet<String> = BTreeSet::new();
        want.insert(td.host(&self.host_id));
        want.extend(ingress.iter().map(|i| td.service(&i.service)));
        want.extend(callers.keys().map(|s| td.service(s)));
        self.wanted.send_if_modified(|w| {
            if *w == want {
                return false;
            }
            *w = want;
            true
        });
        self.leaves
            .retain(|id, _| self.wanted.borrow().contains(id));
        MeshEgress {
            mesh: self.mesh.clone(),
            host_id: self.host_id.clone(),
            callers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::TrustDomain;

    #[test]
    fn mesh_allow_names_services_and_hosts() {
        let m = Mesh {
            trust_domain: TrustDomain::parse("td").unwrap(),
            listen: "10.0.0.1:15443".parse().unwrap(),
            trust: crate::xds::mesh::trust_name("root"),
        };
        assert_eq!(
            allowed(&m, " frontend, host:h-2,,frontend ,Api"),
            [
                "spiffe://td/host/h-2",
                "spiffe://td/svc/Api",
                "spiffe://td/svc/frontend"
            ]
        );
        assert!(allowed(&m, " , ").is_empty());
    }
}
