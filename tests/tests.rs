//! The one integration-test binary, in tiers.
//!
//! - `inproc` (always): a registrar run inside this process with
//!   `registrar::run`, spoken to over its socket and admin endpoint. No
//!   root, Envoy or dockerd; seconds.
//! - The end-to-end tiers (`--features e2e`): the real `envoy-docker`
//!   binary against a real Envoy 1.40 and a real dockerd on loopback, with
//!   proxies spawned the way dockerd spawns them. They need root and say so
//!   loudly without it.

mod inproc;

#[cfg(feature = "e2e")]
mod core;
#[cfg(feature = "e2e")]
mod dashboard;
#[cfg(feature = "e2e")]
mod docker;
#[cfg(feature = "e2e")]
mod firewall;
#[cfg(feature = "e2e")]
mod fleet;
#[cfg(feature = "e2e")]
mod harness;
#[cfg(feature = "e2e")]
mod observability;
#[cfg(feature = "e2e")]
mod packaging;
#[cfg(feature = "e2e")]
mod soak;
#[cfg(feature = "e2e")]
mod transparency;
