//! One row of the mapping table: the mapping, its owner and connection,
//! its name and mode (from the container's labels), its state and who
//! serves it; and what the xDS layer is told of it.

use super::super::docker::meta::ContainerMeta;
use super::super::liveness::OwnerProcess;
use super::journal::{self, Ring};
use crate::mapping::{ContainerRef, Mapping, MappingState, MappingStatus, Mode, Server};
use crate::xds::resource::Service;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub(super) struct Entry {
    pub mapping: Mapping,
    pub mode: Mode,
    pub name: String,
    pub owner: OwnerProcess,
    /// The registrar connection this mapping lives with, if any.
    pub conn: Option<u64>,
    pub state: MappingState,
    /// Who accepts its connections: as ordered, or as its proxy reported.
    pub server: Server,
    /// Connections its proxy has relayed in all, as last reported.
    pub relayed: u64,
    /// The container behind the mapping, once Docker has told us.
    pub container: Option<Arc<ContainerMeta>>,
    /// When it was registered, until every Envoy has ACKed it once.
    pub since: Option<Instant>,
    /// When `server` last changed (Unix ms), for the dashboard.
    pub server_since_ms: u64,
    /// Its own recent events (hand-overs, take-backs, NACKs).
    pub events: Ring,
}

impl Entry {
    pub fn listener(&self) -> String {
        self.mapping.key.resource_name()
    }

    /// Sets name and mode from the container's labels; true if they changed.
    pub fn describe(&mut self, default_mode: Mode) -> bool {
        let (name, mode) = match &self.container {
            Some(c) => (
                c.naming().name,
                c.mode_for(self.mapping.backend.container_port)
                    .unwrap_or(default_mode),
            ),
            None => (default_name(&self.mapping), default_mode),
        };
        let changed = name != self.name || mode != self.mode;
        self.name = name;
        self.mode = mode;
        changed
    }
}

impl Entry {
    /// A new registration, named after its backend until Docker says more.
    pub fn new(
        mapping: Mapping,
        owner: OwnerProcess,
        conn: Option<u64>,
        server: Server,
        mode: Mode,
    ) -> Entry {
        Entry {
            mapping,
            mode,
            name: default_name(&mapping),
            owner,
            conn,
            state: MappingState::Pending,
            server,
            relayed: 0,
            container: None,
            since: Some(Instant::now()),
            server_since_ms: journal::now_ms(),
            events: Ring::new(journal::PER_MAPPING),
        }
    }

    /// The row `status` and `/mappings` show.
    pub fn status(&self) -> MappingStatus {
        MappingStatus {
            mapping: self.mapping,
            mode: self.mode,
            name: self.name.clone(),
            state: self.state.clone(),
            server: self.server,
            owner_pid: self.owner.pid,
            container: self.container.as_ref().map(|c| ContainerRef {
                id: c.id.clone(),
                name: c.name.clone(),
            }),
        }
    }
}

/// A mapping as the dashboard shows it: the row `status` has, and what
/// only the dashboard needs.
#[derive(Debug, Clone)]
pub struct DashRow {
    pub status: MappingStatus,
    /// When who serves it last changed (Unix ms).
    pub since_ms: u64,
    /// The `ServiceName` label as the container has it.
    pub service: Option<String>,
    pub image: Option<String>,
    /// Its cluster's name in Envoy (and so its stat prefix).
    pub cluster: String,
}

/// One mapping in full, for its page.
#[derive(Debug, Clone)]
pub struct Detail {
    pub row: DashRow,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its events, newest first.
    pub events: Vec<journal::Event>,
}

impl Entry {
    pub fn dash_row(&self) -> DashRow {
        DashRow {
            status: self.status(),
            since_ms: self.server_since_ms,
            service: self.container.as_ref().and_then(|c| {
                c.labels
                    .get(super::super::docker::meta::SERVICE_LABEL)
                    .cloned()
            }),
            image: self.container.as_ref().map(|c| c.image.clone()),
            cluster: crate::xds::resource::cluster_name(&self.name, &self.mapping.key),
        }
    }

    pub fn detail(&self) -> Detail {
        Detail {
            row: self.dash_row(),
            labels: self
                .container
                .as_ref()
                .map(|c| c.labels.clone())
                .unwrap_or_default(),
            events: self.events.newest_first(),
        }
    }
}

/// What the xDS layer needs to know of one mapping.
pub fn service(e: &Entry) -> Service {
    let (service, environment) = match &e.container {
        Some(c) => {
            let n = c.naming();
            (n.service, n.environment)
        }
        None => (e.name.clone(), None),
    };
    Service {
        key: e.mapping.key,
        backend: e.mapping.backend,
        mode: e.mode,
        name: e.name.clone(),
        service,
        environment,
        container: e.container.as_ref().map(|c| c.name.clone()),
        image: e.container.as_ref().map(|c| c.image.clone()),
        // Only a byte stream can carry the header: HTTP has X-Forwarded-For.
        proxy_protocol: match e.mode {
            Mode::Tcp => e.container.as_ref().and_then(|c| c.proxy_protocol()),
            Mode::Http | Mode::Auto => None,
        },
    }
}

/// The name a mapping has until Docker tells us better: the container's
/// address, which is unique and stable for the container's life.
fn default_name(m: &Mapping) -> String {
    crate::mapping::sanitize(&format!(
        "{}-{}",
        m.backend.container_ip, m.backend.container_port
    ))
}
