//! The `envoy-docker` binary: runs the chosen role and exits with its
//! status.

fn main() -> std::process::ExitCode {
    envoy_docker::run(std::env::args_os().collect())
}
