//! The soak in short (issue 22): `bench/soak.py` for three minutes on the
//! real Docker 28 engine, with this build as its userland proxy and the
//! fleet on. Containers start and stop all the while, a bounded client
//! loop probes every published port, and every fault of the long soak is
//! drawn: Envoy and registrar SIGKILL, registrar SIGSTOP, dockerd restart
//! with `--restart always` containers, an etcd member killed, and the nft
//! table deleted by hand. The script's own verdict is the test's: no
//! failed connection outside a fault window, every window closed, no
//! mapping that disagrees with `docker ps`, no crash, and the registrar's
//! and Envoy's memory and descriptors flat. The test then checks that the
//! run was a real one, so that it cannot pass by doing nothing.

use crate::harness::{self, dockerd::DOCKERD_28_DEFAULT, dockerd::DOCKERD_28_ENV, TempDir};
use std::process::Command;

fn number(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("no number at {path:?} in the soak's report"))
}

#[test]
fn soak_three_minutes_of_churn_and_every_fault_on_docker28() {
    let bin = harness::bin();
    let dir = TempDir::new("soak");
    let json = dir.path("soak.json");
    let logs = dir.path("logs");
    let dockerd = std::env::var(DOCKERD_28_ENV).unwrap_or(DOCKERD_28_DEFAULT.into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/soak.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--minutes", "3", "--fleet", "--fault-every", "8,15"])
        .args(["--binary", bin, "--dockerd", &dockerd])
        .args(["--envoy", &harness::envoy_bin()])
        .arg("--json")
        .arg(&json)
        .arg("--keep-logs")
        .arg(&logs)
        .output()
        .expect("run bench/soak.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the soak failed ({}); its logs are in {}\n{stdout}\n{stderr}",
        out.status,
        logs.display()
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the soak's report"))
            .expect("the soak's report is JSON");
    assert_eq!(rep["verdict"], "pass", "{stdout}");
    // It was a real run: churn, traffic, and every kind of fault.
    assert!(
        number(&rep, &["churn", "containers_started"]) >= 60.0,
        "{stdout}"
    );
    assert!(number(&rep, &["clients", "ok"]) >= 1000.0, "{stdout}");
    let kinds: std::collections::BTreeSet<&str> = rep["faults"]
        .as_array()
        .expect("the faults")
        .iter()
        .filter_map(|w| w["fault"].as_str())
        .collect();
    for kind in [
        "envoy_sigkill",
        "registrar_sigkill",
        "registrar_sigstop",
        "dockerd_restart",
        "nft_table_delete",
        "etcd_member_kill",
    ] {
        assert!(
            kinds.contains(kind),
            "{kind} was never drawn: {kinds:?}\n{stdout}"
        );
    }
    assert_eq!(number(&rep, &["disagreements", "registrar"]), 0.0);
    assert_eq!(
        number(&rep, &["failures_by_window", "outside any fault"]),
        0.0
    );
}
