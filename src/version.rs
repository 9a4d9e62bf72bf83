//! The version line that `version`, `--version` and `docker-proxy -v` print.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("ENVOY_DOCKER_COMMIT");

pub fn line() -> String {
    format!("envoy-docker {VERSION} (commit {COMMIT}, Envoy API: xDS v3 ADS, SotW and delta)")
}
