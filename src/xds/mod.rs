//! The xDS side of the registrar, as a library that knows nothing of the
//! registrar, in layers:
//! - `resource`: one resource (name, content version, packed message) and
//!   the `Service` facts resources are built from;
//! - `resources` and `telemetry`: pure builders of Envoy messages, shaped
//!   by `serving` (sniff timeout and operator limits);
//! - `egress`: the fleet's egress listener, cluster and assignment per
//!   service port, built from the catalog;
//! - `bootstrap`: the Envoy bootstrap that points Envoy at the server;
//! - `snapshot`: the cache, one consistent set of resources per type,
//!   changed one resource at a time and cloned in O(1);
//! - `session`: the per-stream protocol state machine (no I/O);
//! - `mesh`: the mesh's secrets, ingress and upstream TLS (`--mesh`);
//! - `server`: the ADS service, which moves messages between tonic's gRPC
//!   streams and the sessions, and reports through its `Control` trait;
//! - `access_log`: the access-log service beside it, which turns the mesh
//!   ingress's log entries into per-caller counts for `Control`.

pub mod access_log;
pub mod bootstrap;
pub mod egress;
pub mod mesh;
pub mod resource;
pub mod resources;
pub mod server;
pub mod serving;
pub mod session;
pub mod snapshot;
pub mod telemetry;
