//! The one integration-test binary. Every test here runs the real
//! `envoy-docker` binary against a real Envoy 1.40 on loopback, with the
//! proxy spawned the way dockerd spawns it (a pipe on fd 3).

mod core;
mod docker;
mod harness;
mod observability;
mod packaging;
