//! The `envoy-docker` binary: maps the chosen role's result to an exit code.

fn main() {
    std::process::exit(envoy_docker::run(std::env::args_os().collect()));
}
