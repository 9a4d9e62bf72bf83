#!/usr/bin/env bash
# The mesh against plain egress, across hosts (issue 21): two runs on three
# fresh Docker hosts in network namespaces, one without --mesh and one with
# it, in one go. Requests per second with keep-alive and with a new
# connection per request, TLS handshakes per second, and the memory that
# one more service (one more identity, with the mesh) costs the registrar
# and Envoy at 50 services on a host. The benchmark itself is
# tests/fleet/mesh_bench.rs, which uses the suite's host set-up; it is
# ignored by the suite and run here, in a release build.
#
# Needs root, what .ci/run installs, nginx and wrk (apt-get install
# nginx-light wrk). MESH_BENCH_SECONDS sets each wrk run's length (10).
# Prints a table and writes target/bench/mesh.json. Traffic stays inside
# the namespaces the benchmark makes.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx wrk; do
  command -v "$tool" >/dev/null || { echo "bench/mesh.sh needs $tool" >&2; exit 1; }
done
exec cargo test --release --locked --features e2e --test tests fleet::mesh_bench \
  -- --ignored --nocapture --test-threads 1
