//! The registrar's own metrics, as Prometheus text: counters and a
//! histogram in one `Metrics` value that the registry owns and hands out,
//! and gauges from the mapping table, given at scrape time.

use crate::mapping::MappingStatus;
use crate::xds::snapshot::Kind;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the registration-to-ACK histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    registrations: AtomicU64,
    deregistrations: AtomicU64,
    pushes: [AtomicU64; 4],
    acks: [AtomicU64; 4],
    nacks: [AtomicU64; 4],
    docker_events: AtomicU64,
    handovers: AtomicU64,
    takebacks: AtomicU64,
    relayed: AtomicU64,
    ready: Mutex<Histogram>,
    mesh: Mutex<MeshTally>,
}

/// Most (service, caller) pairs counted one by one; the rest are counted
/// under [`OTHER`], so a caller that forges names cannot grow memory.
pub const MESH_PAIRS: usize = 1000;
/// The service and caller that counts past [`MESH_PAIRS`] go to.
pub const OTHER: &str = "other";

/// Calls to the mesh ingress: handshakes, failed handshakes and RBAC
/// denials per service and caller, as the access-log service reports.
#[derive(Debug, Default)]
struct MeshTally {
    /// `.<trust domain>`, which an SNI ends with.
    suffix: String,
    calls: BTreeMap<(String, String), MeshCounts>,
}

/// Counts for one service and caller.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MeshCounts {
    pub handshakes: u64,
    pub failed: u64,
    pub denied: u64,
}

impl Metrics {
    pub fn registered(&self) {
        self.registrations.fetch_add(1, Relaxed);
    }
    pub fn deregistered(&self) {
        self.deregistrations.fetch_add(1, Relaxed);
    }
    pub fn pushed(&self, kind: Kind) {
        self.pushes[kind as usize].fetch_add(1, Relaxed);
    }
    pub fn answered(&self, kind: Kind, nack: bool) {
        let set = if nack { &self.nacks } else { &self.acks };
        set[kind as usize].fetch_add(1, Relaxed);
    }
    pub fn docker_event(&self) {
        self.docker_events.fetch_add(1, Relaxed);
    }
    /// A proxy confirmed that it closed its socket and Envoy alone serves.
    pub fn handed_over(&self) {
        self.handovers.fetch_add(1, Relaxed);
    }
    /// A proxy was told to take its port back from Envoy.
    pub fn took_back(&self) {
        self.takebacks.fetch_add(1, Relaxed);
    }
    /// Connections the proxies relayed by themselves, as they report them.
    pub fn relayed(&self, n: u64) {
        self.relayed.fetch_add(n, Relaxed);
    }
    /// The mesh is on, in trust domain `td`: SNIs are `<service>.<td>`.
    pub fn mesh_domain(&self, td: &str) {
        self.mesh.lock().unwrap_or_else(|p| p.into_inner()).suffix = format!(".{td}");
    }
    /// The mesh ingress logged a call. A caller without a certificate is
    /// `-`, as is a service whose SNI is not in the trust domain.
    pub fn mesh_event(&self, e: &crate::xds::access_log::MeshEvent) {
        use crate::xds::access_log::Outcome;
        let mut t = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
        let service = e
            .sni
            .strip_suffix(t.suffix.as_str())
            .filter(|s| !s.is_empty() && !t.suffix.is_empty())
            .unwrap_or("-")
            .to_string();
        let caller = e.caller.clone().unwrap_or_else(|| "-".into());
        let mut key = (service, caller);
        if !t.calls.contains_key(&key) && t.calls.len() >= MESH_PAIRS {
            key = (OTHER.into(), OTHER.into());
        }
        let c = t.calls.entry(key).or_default();
        match e.outcome {
            Outcome::Handshake => c.handshakes += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Denied => c.denied += 1,
        }
    }
    /// The mesh ingress's calls so far, by service and caller.
    pub fn mesh_calls(&self) -> Vec<(String, String, MeshCounts)> {
        let t = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
        t.calls
            .iter()
            .map(|((s, c), n)| (s.clone(), c.clone(), *n))
            .collect()
    }
    /// Time from a registration to every connected Envoy's ACK.
    pub fn ready_after(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let mut h = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Whether published ports are claimed in nftables, and how many.
pub fn render_ports(ports: &crate::nft::PortsState) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "envoy_docker_ports_claimed",
        "gauge",
        "1 while published ports are claimed in nftables (ahead of Docker's DNAT), else 0.",
    );
    let _ = writeln!(
        out,
        "envoy_docker_ports_claimed {}",
        u8::from(ports.claimed())
    );
    family(
        &mut out,
        "envoy_docker_claimed_bindings",
        "gauge",
        "Port bindings (proto, host address, port) claimed in nftables.",
    );
    let n = match ports {
        crate::nft::PortsState::Claimed { ports } => *ports,
        _ => 0,
    };
    let _ = writeln!(out, "envoy_docker_claimed_bindings {n}");
    out
}

/// The fleet's families, with `serve --catalog`: catalog instances by
/// service and health, whether etcd answers, and failed etcd calls.
pub fn render_fleet(
    state: &super::state::fleet::EtcdState,
    catalog: &super::state::fleet::Instances,
) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "envoy_docker_fleet_instances",
        "gauge",
        "Instances in the fleet's catalog, as last read, by service and health.",
    );
    let mut by: BTreeMap<(&str, String), u64> = BTreeMap::new();
    for i in catalog.values() {
        *by.entry((&i.service, format!("{:?}", i.health).to_lowercase()))
            .or_default() += 1;
    }
    for ((service, health), n) in &by {
        let service = label_value(service);
        let _ = writeln!(
            out,
            "envoy_docker_fleet_instances{{service=\"{service}\",health=\"{health}\"}} {n}"
        );
    }
    family(
        &mut out,
        "envoy_docker_etcd_up",
        "gauge",
        "1 while etcd answers, 0 while it cannot be reached.",
    );
    let up = u8::from(state.error.is_none() && state.seen);
    let _ = writeln!(out, "envoy_docker_etcd_up {up}");
    family(
        &mut out,
        "envoy_docker_etcd_errors_total",
        "counter",
        "Calls to etcd that failed.",
    );
    let _ = writeln!(out, "envoy_docker_etcd_errors_total {}", state.errors);
    out
}

/// The mesh's families, with `serve --mesh`: when each identity's leaf
/// expires, how many leaves it was issued, and the mesh ingress's calls
/// (handshakes by outcome, and RBAC denials) per service and caller.
pub fn render_mesh(
    leaves: &[(String, super::state::mesh::LeafState)],
    calls: &[(String, String, MeshCounts)],
) -> String {
    if leaves.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    family(
        &mut out,
        "envoy_docker_mesh_leaf_expiry_seconds",
        "gauge",
        "When each identity's current certificate expires, in Unix time.",
    );
    for (id, l) in leaves {
        let at = l
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "envoy_docker_mesh_leaf_expiry_seconds{{identity=\"{}\"}} {at}",
            label_value(id)
        );
    }
    family(
        &mut out,
        "envoy_docker_mesh_leaves_issued_total",
        "counter",
        "Certificates issued to each identity since start; all but the first are rotations.",
    );
    for (id, l) in leaves {
        let _ = writeln!(
            out,
            "envoy_docker_mesh_leaves_issued_total{{identity=\"{}\"}} {}",
            label_value(id),
            l.issued
        );
    }
    family(
        &mut out,
        "envoy_docker_mesh_handshakes_total",
        "counter",
        "TLS handshakes at the mesh port, by service, caller (its SPIFFE id, - without a certificate) and outcome, counted as each connection closes.",
    );
    for (service, caller, n) in calls {
        let (s, c) = (label_value(service), label_value(caller));
        for (outcome, v) in [("ok", n.handshakes), ("failed", n.failed)] {
            if v > 0 {
                let _ = writeln!(
                    out,
                    "envoy_docker_mesh_handshakes_total{{service=\"{s}\",caller=\"{c}\",outcome=\"{outcome}\"}} {v}"
                );
            }
        }
    }
    family(
        &mut out,
        "envoy_docker_mesh_denied_total",
        "counter",
        "Calls that a service's MeshAllow refused, by service and caller.",
    );
    for (service, caller, n) in calls.iter().filter(|(_, _, n)| n.denied > 0) {
        let _ = writeln!(
            out,
            "envoy_docker_mesh_denied_total{{service=\"{}\",caller=\"{}\"}} {}",
            label_value(service),
            label_value(caller),
            n.denied
        );
    }
    out
}

/// A label value as Prometheus's text format wants it: the catalog's
/// service names come from other hosts, and may hold anything.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole `/metrics` page: the counters, and gauges from the mapping
/// table (`rows`) and the number of Envoys connected.
pub fn render(m: &Metrics, rows: &[MappingStatus], envoys: usize) -> String {
    let mut out = String::new();

    family(
        &mut out,
        "envoy_docker_mappings",
        "gauge",
        "Registered port mappings by protocol and state.",
    );
    let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
    for proto in ["tcp", "udp"] {
        for state in ["pending", "active", "failed"] {
            by.insert((proto.into(), state.into()), 0);
        }
    }
    for s in rows {
        *by.entry((s.mapping.key.proto.to_string(), s.state.label().to_string()))
            .or_default() += 1;
    }
    for ((proto, state), n) in &by {
        let _ = writeln!(
            out,
            "envoy_docker_mappings{{proto=\"{proto}\",state=\"{state}\"}} {n}"
        );
    }

    family(
        &mut out,
        "envoy_docker_mappings_served",
        "gauge",
        "Registered port mappings by who accepts their connections now.",
    );
    let mut by: BTreeMap<&str, u64> = ["envoy", "relay", "handover"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for s in rows {
        *by.entry(s.server.as_str()).or_default() += 1;
    }
    for (server, n) in &by {
        let _ = writeln!(out, "envoy_docker_mappings_served{{by=\"{server}\"}} {n}");
    }

    family(
        &mut out,
        "envoy_docker_envoys_connected",
        "gauge",
        "Envoy ADS streams open now.",
    );
    let _ = writeln!(out, "envoy_docker_envoys_connected {envoys}");

    for (name, help, v) in [
        (
            "envoy_docker_registrations_total",
            "Mappings registered.",
            &m.registrations,
        ),
        (
            "envoy_docker_deregistrations_total",
            "Mappings removed, for any reason.",
            &m.deregistrations,
        ),
        (
            "envoy_docker_docker_events_total",
            "Container events seen from Docker.",
            &m.docker_events,
        ),
        (
            "envoy_docker_handovers_total",
            "Ports a proxy handed over to Envoy.",
            &m.handovers,
        ),
        (
            "envoy_docker_takebacks_total",
            "Ports a proxy was told to take back because no Envoy held them.",
            &m.takebacks,
        ),
        (
            "envoy_docker_relayed_connections_total",
            "TCP connections the proxies relayed by themselves (reported about once a second).",
            &m.relayed,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
    for (name, help, set) in [
        (
            "envoy_docker_xds_pushes_total",
            "xDS responses sent, by resource type.",
            &m.pushes,
        ),
        (
            "envoy_docker_xds_acks_total",
            "xDS ACKs received, by resource type.",
            &m.acks,
        ),
        (
            "envoy_docker_xds_nacks_total",
            "xDS NACKs received, by resource type.",
            &m.nacks,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for kind in Kind::ALL {
            let _ = writeln!(
                out,
                "{name}{{type=\"{}\"}} {}",
                kind.short(),
                set[kind as usize].load(Relaxed)
            );
        }
    }

    let name = "envoy_docker_registration_ready_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Time from a registration until every connected Envoy ACKed its listener.",
    );
    let h = m.ready.lock().unwrap_or_else(|p| p.into_inner());
    for (le, n) in BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ContainerInfo, Health, Instance};
    use crate::mapping::Mode;
    use std::sync::Arc;

    #[test]
    fn mesh_calls_are_counted_by_service_and_caller_and_bounded() {
        use crate::xds::access_log::{MeshEvent, Outcome};
        let m = Metrics::default();
        m.mesh_domain("td");
        let ev = |sni: &str, caller: Option<&str>, outcome| MeshEvent {
            sni: sni.into(),
            caller: caller.map(String::from),
            outcome,
        };
        let front = Some("spiffe://td/svc/frontend");
        m.mesh_event(&ev("web.td", front, Outcome::Handshake));
        m.mesh_event(&ev("web.td", front, Outcome::Handshake));
        m.mesh_event(&ev("web.td", front, Outcome::Denied));
        m.mesh_event(&ev("web.other", None, Outcome::Failed));
        m.mesh_event(&ev(".td", None, Outcome::Failed));
        let calls = m.mesh_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].0, "-");
        assert_eq!(calls[0].2.failed, 2);
        assert_eq!(
            (calls[1].0.as_str(), calls[1].1.as_str()),
            ("web", "spiffe://td/svc/frontend")
        );
        assert_eq!(
            calls[1].2,
            MeshCounts {
                handshakes: 2,
                failed: 0,
                denied: 1
            }
        );
        let leaf = super::super::state::mesh::LeafState {
            not_after: std::time::UNIX_EPOCH + Duration::from_secs(100),
            issued: 1,
        };
        let text = render_mesh(&[("spiffe://td/svc/web".into(), leaf)], &calls);
        assert!(text.contains(r#"envoy_docker_mesh_handshakes_total{service="web",caller="spiffe://td/svc/frontend",outcome="ok"} 2"#), "{text}");
        assert!(
            text.contains(
                r#"envoy_docker_mesh_handshakes_total{service="-",caller="-",outcome="failed"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"envoy_docker_mesh_denied_total{service="web",caller="spiffe://td/svc/frontend"} 1"#), "{text}");
        // Forged names beyond the bound all land on one pair.
        for i in 0..MESH_PAIRS + 10 {
            let caller = format!("spiffe://td/host/h{i}");
            m.mesh_event(&ev("web.td", Some(&caller), Outcome::Handshake));
        }
        let calls = m.mesh_calls();
        assert_eq!(calls.len(), MESH_PAIRS + 1);
        let other = calls.iter().find(|c| c.0 == OTHER).unwrap();
        assert_eq!(other.2.handshakes, 12);
    }

    #[test]
    fn fleet_families_escape_what_other_hosts_wrote() {
        let odd = Instance {
            service: "we\"b\\\n".into(),
            environment: None,
            host_id: "b".into(),
            address: "10.0.0.2:80".parse().unwrap(),
            mode: Mode::Tcp,
            container: ContainerInfo {
                name: "x".into(),
                id: "1".into(),
            },
            image: String::new(),
            health: Health::Unhealthy,
            service_port: None,
            mesh_port: None,
            check: None,
        };
        let catalog = Arc::new([("k".to_string(), odd)].into());
        let mut state = super::super::state::fleet::EtcdState {
            seen: true,
            errors: 3,
            ..Default::default()
        };
        let text = render_fleet(&state, &catalog);
        assert!(
            text.contains(
                r#"envoy_docker_fleet_instances{service="we\"b\\\n",health="unhealthy"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("envoy_docker_etcd_up 1\n"));
        assert!(text.contains("envoy_docker_etcd_errors_total 3\n"));
        state.error = Some("down".into());
        assert!(render_fleet(&state, &catalog).contains("envoy_docker_etcd_up 0\n"));
    }
}
