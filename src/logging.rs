//! Logs go to stderr, at the level named by `ENVOY_DOCKER_LOG`
//! (error, warn, info, debug or trace; info by default). The libraries
//! underneath (tonic, h2) only log warnings.

use tracing::Level;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

pub fn init() {
    let level = match std::env::var("ENVOY_DOCKER_LOG").as_deref() {
        Ok("error") => Level::ERROR,
        Ok("warn") => Level::WARN,
        Ok("debug") => Level::DEBUG,
        Ok("trace") => Level::TRACE,
        _ => Level::INFO,
    };
    let filter = Targets::new()
        .with_target("envoy_docker", level)
        .with_default(Level::WARN.min(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}
