//! How the registrar hears from its xDS server: the server's `Control`
//! calls, handed to the registry's task as inputs and counted in its
//! metrics. The xDS side stays unaware of the registry.

use super::keeper::{Input, Registrar};
use crate::xds::server::Control;
use crate::xds::session::{Feedback, Flavor};
use crate::xds::snapshot::Kind;
use std::sync::Arc;

pub struct Envoys {
    registrar: Registrar,
}

impl Envoys {
    pub fn new(registrar: Registrar) -> Arc<Envoys> {
        Arc::new(Envoys { registrar })
    }
}

impl Control for Envoys {
    fn connected(&self, stream: u64, flavor: Flavor) {
        self.registrar.tell(Input::EnvoyConnected(stream, flavor));
    }

    fn feedback(&self, envoy: u64, fb: Feedback) {
        self.registrar.tell(Input::EnvoyFeedback(envoy, fb));
    }

    fn stalled(&self, envoy: u64, stalled: bool) {
        self.registrar.tell(Input::EnvoyStalled(envoy, stalled));
    }

    fn gone(&self, envoy: u64) {
        self.registrar.tell(Input::EnvoyGone(envoy));
    }

    fn pushed(&self, kind: Kind) {
        self.registrar.metrics().pushed(kind);
    }

    fn answered(&self, kind: Kind, nack: bool) {
        self.registrar.metrics().answered(kind, nack);
    }

    fn mesh(&self, event: crate::xds::access_log::MeshEvent) {
        self.registrar.metrics().mesh_event(&event);
    }
}
