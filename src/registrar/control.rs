//! How the registrar hears from its xDS server: the server's `Control`
//! calls, passed on to the registry and counted in its metrics. The xDS
//! side stays unaware of the registry.

use super::metrics::Metrics;
use super::state::Shared;
use crate::xds::server::Control;
use crate::xds::session::Feedback;
use crate::xds::snapshot::Kind;
use std::sync::Arc;

pub struct Envoys {
    registry: Shared,
    metrics: Arc<Metrics>,
}

impl Envoys {
    pub fn new(registry: Shared) -> Arc<Envoys> {
        let metrics = registry.lock().expect("registry").metrics();
        Arc::new(Envoys { registry, metrics })
    }
}

impl Control for Envoys {
    fn connected(&self, stream: u64) -> u64 {
        self.registry
            .lock()
            .expect("registry")
            .envoy_connected(stream)
    }

    fn feedback(&self, envoy: u64, fb: Feedback) {
        self.registry
            .lock()
            .expect("registry")
            .envoy_feedback(envoy, fb);
    }

    fn stalled(&self, envoy: u64, stalled: bool) {
        self.registry
            .lock()
            .expect("registry")
            .envoy_stalled(envoy, stalled);
    }

    fn gone(&self, envoy: u64) {
        self.registry.lock().expect("registry").envoy_gone(envoy);
    }

    fn pushed(&self, kind: Kind) {
        self.metrics.pushed(kind);
    }

    fn answered(&self, kind: Kind, nack: bool) {
        self.metrics.answered(kind, nack);
    }
}
