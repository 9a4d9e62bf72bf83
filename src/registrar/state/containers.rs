//! The containers Docker told us about, by id: what names a mapping and
//! sets its mode. An address belongs to the newest container that has it.

use super::super::docker::meta::ContainerMeta;
use crate::mapping::{Mapping, Mode};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub(super) struct Containers {
    by_id: BTreeMap<String, Arc<ContainerMeta>>,
}

impl Containers {
    /// Keeps `meta`, dropping older containers that had its addresses.
    pub fn remember(&mut self, meta: ContainerMeta, default_mode: Mode) -> Arc<ContainerMeta> {
        for problem in meta.label_problems() {
            tracing::warn!(
                "container {}: {problem} (default mode {})",
                meta.name,
                default_mode.as_str()
            );
        }
        if meta.proxy_protocol().is_some()
            && default_mode != Mode::Tcp
            && !meta.labels.iter().any(|(k, v)| {
                k.starts_with(super::super::docker::meta::MODE_LABEL)
                    && Mode::parse(v) == Some(Mode::Tcp)
            })
        {
            tracing::warn!(
                "container {}: ProxyProtocol applies to tcp-mode ports only, and none of its \
                 ports is in tcp mode; label it ProxyMode=tcp or ProxyMode_<port>=tcp",
                meta.name
            );
        }
        // A reused address belongs to the new container now.
        self.by_id
            .retain(|id, c| id == &meta.id || !c.ips.iter().any(|ip| meta.ips.contains(ip)));
        let meta = Arc::new(meta);
        self.by_id.insert(meta.id.clone(), meta.clone());
        meta
    }

    /// The container that serves the mapping's backend, if known.
    pub fn serving(&self, m: &Mapping) -> Option<Arc<ContainerMeta>> {
        self.by_id
            .values()
            .find(|c| {
                c.serves(
                    m.backend.container_ip,
                    m.backend.container_port,
                    m.key.proto,
                )
            })
            .cloned()
    }

    /// The container is gone: its address may be reused by the next one.
    /// True if it was known.
    pub fn forget(&mut self, id: &str) -> bool {
        self.by_id.remove(id).is_some()
    }

    /// Every known container.
    pub fn all(&self) -> impl Iterator<Item = &ContainerMeta> {
        self.by_id.values().map(|c| &**c)
    }

    /// What is known of container `id`, if anything.
    pub fn get(&self, id: &str) -> Option<&ContainerMeta> {
        self.by_id.get(id).map(|c| &**c)
    }
}
