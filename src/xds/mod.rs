//! The xDS side of the registrar, in layers: `resources` builds Envoy
//! messages from mappings (pure), `snapshot` holds one consistent set of
//! them, `session` is the per-stream protocol state machine (no I/O), and
//! `server` moves messages between tonic's gRPC streams and the sessions.

pub mod resources;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod telemetry;
