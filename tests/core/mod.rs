//! The core issue's end-to-end tests: the proxy role, the registrar and a
//! real Envoy on loopback.

mod handover;
mod hardening;
mod input;
mod lifecycle;
mod serving;
