//! Unit tests of the stream state machine: requests in, responses out.

use super::*;
use crate::mapping::{Backend, MappingKey, Mode, Proto};
use crate::xds::resources::Service;

fn svc(port: u16, name: &str, mode: Mode) -> Service {
    Service {
        key: MappingKey {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: port,
        },
        backend: Backend {
            container_ip: "10.0.0.2".parse().unwrap(),
            container_port: 80,
        },
        mode,
        name: name.into(),
        service: name.into(),
        environment: None,
        container: None,
        image: None,
    }
}

fn snap(services: &[Service]) -> Arc<Snapshot> {
    Arc::new(Snapshot::build(services, &Default::default()))
}

fn names(out: &Outgoing) -> Vec<String> {
    out.resources.iter().map(|r| r.name.clone()).collect()
}

fn one(s: &mut Session) -> Outgoing {
    let mut out = s.poll();
    assert_eq!(out.len(), 1, "expected one response, got {out:?}");
    out.remove(0)
}

fn ack(s: &mut Session, out: &Outgoing) -> Option<Feedback> {
    s.on_request(
        out.kind,
        Incoming {
            nonce: out.nonce.clone(),
            version_info: out.version.clone(),
            names: if out.kind == Kind::Endpoint {
                names(out)
            } else {
                vec![]
            },
            ..Default::default()
        },
    )
}

fn subscribe(s: &mut Session, kind: Kind, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let req = match s.flavor {
        Flavor::Sotw => Incoming {
            names,
            ..Default::default()
        },
        Flavor::Delta => Incoming {
            subscribe: names,
            ..Default::default()
        },
    };
    // A first request reports what Envoy holds; later ones report nothing.
    let _ = s.on_request(kind, req);
}

/// Drives a fresh Envoy to the point where it serves `services`.
fn converge(flavor: Flavor, services: &[Service]) -> Session {
    let mut s = Session::new(flavor, snap(services));
    subscribe(&mut s, Kind::Cluster, &[]);
    let cds = one(&mut s);
    assert_eq!(cds.kind, Kind::Cluster);
    // As Envoy does it: it asks for the endpoints, and ACKs the clusters
    // only once they are warm.
    let clusters: Vec<String> = services.iter().map(|x| x.cluster_name()).collect();
    let refs: Vec<&str> = clusters.iter().map(String::as_str).collect();
    subscribe(&mut s, Kind::Endpoint, &refs);
    let eds = one(&mut s);
    assert_eq!(eds.kind, Kind::Endpoint);
    assert_eq!(names(&eds), clusters);
    ack(&mut s, &eds);
    assert!(s.poll().is_empty(), "listeners wait for the cluster ACK");
    ack(&mut s, &cds);
    subscribe(&mut s, Kind::Listener, &[]);
    let lds = one(&mut s);
    assert_eq!(lds.kind, Kind::Listener);
    let fb = ack(&mut s, &lds).unwrap();
    assert_eq!(fb.held.len(), services.len());
    assert!(s.poll().is_empty());
    s
}

#[test]
fn fresh_envoy_gets_clusters_then_endpoints_then_listeners() {
    for flavor in [Flavor::Sotw, Flavor::Delta] {
        converge(
            flavor,
            &[svc(8080, "a", Mode::Http), svc(8081, "b", Mode::Tcp)],
        );
    }
}

#[test]
fn empty_state_still_answers_the_first_request() {
    for flavor in [Flavor::Sotw, Flavor::Delta] {
        let mut s = Session::new(flavor, snap(&[]));
        subscribe(&mut s, Kind::Cluster, &[]);
        let cds = one(&mut s);
        assert!(cds.resources.is_empty());
        ack(&mut s, &cds);
        subscribe(&mut s, Kind::Listener, &[]);
        let lds = one(&mut s);
        assert_eq!(lds.kind, Kind::Listener);
        assert!(lds.resources.is_empty());
    }
}

#[test]
fn a_new_listener_waits_until_its_cluster_is_warm() {
    let a = svc(8080, "a", Mode::Http);
    let b = svc(8081, "b", Mode::Http);
    let mut s = converge(Flavor::Sotw, std::slice::from_ref(&a));
    s.set_snapshot(snap(&[a.clone(), b.clone()]));
    let cds = one(&mut s);
    assert_eq!(cds.kind, Kind::Cluster);
    assert_eq!(names(&cds).len(), 2);
    ack(&mut s, &cds);
    // Envoy has not yet asked for b's endpoints: nothing may go out, and
    // above all not the listener.
    assert!(s.poll().is_empty());
    subscribe(
        &mut s,
        Kind::Endpoint,
        &[&a.cluster_name(), &b.cluster_name()],
    );
    let eds = one(&mut s);
    assert_eq!(eds.kind, Kind::Endpoint);
    assert!(s.poll().is_empty(), "the listener waits for the EDS ACK");
    ack(&mut s, &eds);
    let lds = one(&mut s);
    assert_eq!(names(&lds), vec![a.listener_name(), b.listener_name()]);
}

#[test]
fn removal_drops_the_listener_before_its_cluster() {
    for flavor in [Flavor::Sotw, Flavor::Delta] {
        let a = svc(8080, "a", Mode::Http);
        let mut s = converge(flavor, std::slice::from_ref(&a));
        s.set_snapshot(snap(&[]));
        let lds = one(&mut s);
        assert_eq!(lds.kind, Kind::Listener, "the listener goes first");
        if flavor == Flavor::Delta {
            assert_eq!(lds.removed, vec![a.listener_name()]);
        } else {
            assert!(lds.resources.is_empty());
        }
        ack(&mut s, &lds);
        let out = s.poll();
        let cds = &out[0];
        assert_eq!(cds.kind, Kind::Cluster);
        assert!(cds.resources.is_empty());
        if flavor == Flavor::Delta {
            assert_eq!(cds.removed, vec![a.cluster_name()]);
        }
    }
}

#[test]
fn a_renamed_cluster_is_warmed_before_the_listener_switches() {
    let old = svc(8080, "old", Mode::Http);
    let new = svc(8080, "new", Mode::Tcp);
    let mut s = converge(Flavor::Delta, std::slice::from_ref(&old));
    s.set_snapshot(snap(std::slice::from_ref(&new)));
    let cds = one(&mut s);
    // The old cluster stays while the old listener uses it.
    assert_eq!(names(&cds), vec![new.cluster_name()]);
    assert!(cds.removed.is_empty());
    ack(&mut s, &cds);
    subscribe(&mut s, Kind::Endpoint, &[&new.cluster_name()]);
    let eds = one(&mut s);
    ack(&mut s, &eds);
    let lds = one(&mut s);
    assert_eq!(lds.kind, Kind::Listener);
    assert_eq!(
        lds.resources[0].cluster.as_deref(),
        Some(new.cluster_name().as_str())
    );
    ack(&mut s, &lds);
    let out = s.poll();
    assert_eq!(out[0].kind, Kind::Cluster);
    assert_eq!(out[0].removed, vec![old.cluster_name()]);
}

#[test]
fn a_mode_change_updates_the_listener_in_place() {
    let http = svc(8080, "a", Mode::Http);
    let mut s = converge(Flavor::Sotw, std::slice::from_ref(&http));
    s.set_snapshot(snap(&[svc(8080, "a", Mode::Tcp)]));
    let lds = one(&mut s);
    assert_eq!(lds.kind, Kind::Listener);
}

#[test]
fn nack_names_the_failed_listener_and_stale_nonces_are_ignored() {
    let a = svc(8080, "a", Mode::Http);
    let b = svc(80, "b", Mode::Http);
    let mut s = Session::new(Flavor::Sotw, snap(&[a.clone(), b.clone()]));
    subscribe(&mut s, Kind::Cluster, &[]);
    let cds = one(&mut s);
    ack(&mut s, &cds);
    subscribe(
        &mut s,
        Kind::Endpoint,
        &[&a.cluster_name(), &b.cluster_name()],
    );
    let eds = one(&mut s);
    ack(&mut s, &eds);
    subscribe(&mut s, Kind::Listener, &[]);
    let lds = one(&mut s);
    // A request with an old nonce changes nothing.
    let stale = Incoming {
        nonce: "0".into(),
        error: Some("x".into()),
        ..Default::default()
    };
    assert_eq!(s.on_request(Kind::Listener, stale), None);
    let error = format!(
        "Error adding/updating listener(s) {}: cannot bind '0.0.0.0:80': Address already in use",
        b.listener_name()
    );
    let fb = s
        .on_request(
            Kind::Listener,
            Incoming {
                nonce: lds.nonce.clone(),
                error: Some(error.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(fb.error, Some(error));
    assert!(fb.held.contains_key(&a.listener_name()));
    assert!(!fb.held.contains_key(&b.listener_name()));
}

#[test]
fn mentions_needs_whole_names() {
    assert!(mentions(
        "listener(s) tcp_0-0-0-0_80: cannot",
        "tcp_0-0-0-0_80"
    ));
    assert!(!mentions(
        "listener(s) tcp_0-0-0-0_8080: cannot",
        "tcp_0-0-0-0_80"
    ));
    assert!(!mentions("xtcp_1", "tcp_1"));
}

#[test]
fn reconnect_with_the_same_state_pushes_nothing() {
    let services = [svc(8080, "a", Mode::Http), svc(8081, "b", Mode::Tcp)];
    // Delta: Envoy lists what it holds.
    let live = converge(Flavor::Delta, &services);
    let mut s = Session::new(Flavor::Delta, snap(&services));
    for kind in Kind::ORDER {
        let initial_versions = live.types[kind as usize]
            .acked
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>();
        let subscribe = if kind == Kind::Endpoint {
            initial_versions.keys().cloned().collect()
        } else {
            vec![]
        };
        s.on_request(
            kind,
            Incoming {
                subscribe,
                initial_versions,
                ..Default::default()
            },
        );
    }
    assert!(s.poll().is_empty());

    // SotW: Envoy names the version it holds.
    let mut live = Session::new(Flavor::Sotw, snap(&services));
    subscribe(&mut live, Kind::Cluster, &[]);
    let cds = one(&mut live);
    ack(&mut live, &cds);
    let clusters: Vec<String> = services.iter().map(|x| x.cluster_name()).collect();
    let refs: Vec<&str> = clusters.iter().map(String::as_str).collect();
    subscribe(&mut live, Kind::Endpoint, &refs);
    subscribe(&mut live, Kind::Listener, &[]);
    let eds = one(&mut live);
    ack(&mut live, &eds);
    let lds = one(&mut live);
    let mut s = Session::new(Flavor::Sotw, snap(&services));
    for (kind, version, names) in [
        (Kind::Cluster, cds.version, vec![]),
        (Kind::Endpoint, eds.version, clusters.clone()),
        (Kind::Listener, lds.version, vec![]),
    ] {
        s.on_request(
            kind,
            Incoming {
                version_info: version,
                names,
                ..Default::default()
            },
        );
    }
    assert!(s.poll().is_empty());

    // A different state on reconnect is answered in full, listeners
    // included, since Envoy already has them.
    let mut s = Session::new(Flavor::Sotw, snap(&services[..1]));
    s.on_request(
        Kind::Listener,
        Incoming {
            version_info: "something-else".into(),
            ..Default::default()
        },
    );
    let lds = one(&mut s);
    assert_eq!(names(&lds), vec![services[0].listener_name()]);
}

#[test]
fn nack_text_is_cut_to_its_first_line() {
    assert_eq!(first_line("one line"), "one line");
    assert_eq!(
        first_line("bad listener x: oops\nstat_prefix: ...\n}"),
        "bad listener x: oops [...]"
    );
    assert!(first_line(&"y".repeat(2000)).len() < 520);
}

fn nack(s: &mut Session, out: &Outgoing, error: &str) -> Feedback {
    s.on_request(
        out.kind,
        Incoming {
            nonce: out.nonce.clone(),
            error: Some(error.into()),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn a_nack_naming_nothing_keeps_what_envoy_had() {
    let a = svc(8080, "a", Mode::Http);
    let mut s = converge(Flavor::Delta, std::slice::from_ref(&a));
    let before = s.types[Kind::Listener as usize].acked.clone();
    s.set_snapshot(snap(&[svc(8080, "a", Mode::Tcp)]));
    let lds = one(&mut s);
    let fb = nack(&mut s, &lds, "Proto constraint validation failed");
    assert_eq!(fb.held, before, "the old listener is what Envoy has");
    // The refused version is not sent again by itself.
    assert!(s.poll().is_empty());
}

#[test]
fn a_refused_delta_listener_is_neither_held_nor_resent() {
    let a = svc(8080, "a", Mode::Http);
    let b = svc(80, "b", Mode::Http);
    let mut s = converge(Flavor::Delta, std::slice::from_ref(&a));
    s.set_snapshot(snap(&[a.clone(), b.clone()]));
    let cds = one(&mut s);
    subscribe(&mut s, Kind::Endpoint, &[&b.cluster_name()]);
    let eds = one(&mut s);
    ack(&mut s, &eds);
    ack(&mut s, &cds);
    let lds = one(&mut s);
    let fb = nack(
        &mut s,
        &lds,
        &format!(
            "Error adding/updating listener(s) {}: cannot bind",
            b.listener_name()
        ),
    );
    assert!(!fb.held.contains_key(&b.listener_name()));
    assert!(s.poll().is_empty(), "a refused version is not pushed again");
    // An unrelated change later does not make it count as held.
    s.set_snapshot(snap(&[svc(8080, "a", Mode::Tcp), b.clone()]));
    let lds = one(&mut s);
    assert_eq!(names(&lds), vec![a.listener_name()]);
    let fb = ack(&mut s, &lds).unwrap();
    assert!(!fb.held.contains_key(&b.listener_name()));
}

#[test]
fn a_reconnect_reports_what_envoy_holds_and_refreshes_rebuilt_clusters() {
    let a = svc(8080, "a", Mode::Http);
    let live = converge(Flavor::Delta, std::slice::from_ref(&a));
    let held = |k: Kind| live.types[k as usize].acked.clone();
    let mut s = Session::new(Flavor::Delta, snap(std::slice::from_ref(&a)));
    // Envoy says it holds a different cluster version: it gets the cluster
    // again, and then a fresh assignment although it holds the same one.
    let mut clusters = held(Kind::Cluster);
    clusters.insert(a.cluster_name(), "older".into());
    s.on_request(
        Kind::Cluster,
        Incoming {
            initial_versions: clusters.into_iter().collect(),
            ..Default::default()
        },
    );
    let cds = one(&mut s);
    assert_eq!(names(&cds), vec![a.cluster_name()]);
    let fb = s
        .on_request(
            Kind::Endpoint,
            Incoming {
                subscribe: vec![a.cluster_name()],
                initial_versions: held(Kind::Endpoint).into_iter().collect(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        fb.held.is_empty(),
        "a rebuilt cluster's endpoints are not held"
    );
    let eds = one(&mut s);
    assert_eq!(eds.kind, Kind::Endpoint);
    // The first LDS request reports the listeners Envoy has.
    let fb = s
        .on_request(
            Kind::Listener,
            Incoming {
                initial_versions: held(Kind::Listener).into_iter().collect(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(fb.held, held(Kind::Listener));
}

#[test]
fn a_cluster_without_endpoints_gets_an_empty_assignment() {
    let a = svc(8080, "a", Mode::Http);
    let b = svc(8081, "b", Mode::Http);
    let mut s = converge(Flavor::Sotw, std::slice::from_ref(&a));
    s.set_snapshot(snap(&[a.clone(), b.clone()]));
    let cds = one(&mut s);
    assert_eq!(cds.kind, Kind::Cluster);
    // b's mapping goes away before Envoy asks for b's endpoints.
    s.set_snapshot(snap(std::slice::from_ref(&a)));
    subscribe(
        &mut s,
        Kind::Endpoint,
        &[&a.cluster_name(), &b.cluster_name()],
    );
    let eds = one(&mut s);
    let empty = eds
        .resources
        .iter()
        .find(|r| r.name == b.cluster_name())
        .unwrap();
    assert_eq!(
        empty.version,
        crate::xds::resources::no_endpoints(&b.cluster_name()).version
    );
}

#[test]
fn a_reconnect_keeps_clusters_envoy_holds_until_its_listeners_move_on() {
    // While the registrar was down, container `old` was renamed `new`:
    // Envoy still has the old cluster, used by the old listener.
    let old = svc(8080, "old", Mode::Http);
    let new = svc(8080, "new", Mode::Http);
    let live = converge(Flavor::Delta, std::slice::from_ref(&old));
    let held = |k: Kind| live.types[k as usize].acked.clone();
    let mut s = Session::new(Flavor::Delta, snap(std::slice::from_ref(&new)));
    for kind in Kind::ORDER {
        let subscribe = if kind == Kind::Endpoint {
            vec![old.cluster_name(), new.cluster_name()]
        } else {
            vec![]
        };
        s.on_request(
            kind,
            Incoming {
                subscribe,
                initial_versions: held(kind).into_iter().collect(),
                ..Default::default()
            },
        );
    }
    let out = s.poll();
    let cds = out.iter().find(|o| o.kind == Kind::Cluster).unwrap();
    assert_eq!(names(cds), vec![new.cluster_name()]);
    assert!(cds.removed.is_empty(), "the old cluster must stay for now");
    let cds = cds.clone();
    for o in &out {
        if o.kind == Kind::Endpoint {
            ack(&mut s, o);
        }
    }
    ack(&mut s, &cds);
    let lds = one(&mut s);
    assert_eq!(lds.kind, Kind::Listener);
    ack(&mut s, &lds);
    let out = s.poll();
    assert_eq!(out[0].kind, Kind::Cluster);
    assert_eq!(out[0].removed, vec![old.cluster_name()]);
}

#[test]
fn a_stream_lags_until_it_holds_every_listener_and_a_refusal_counts_as_an_answer() {
    let services = [svc(80, "web", Mode::Http)];
    // A peer that only ever asks for listeners never gets them (their
    // cluster never warms), so it lags for good.
    let mut rogue = Session::new(Flavor::Sotw, snap(&services));
    subscribe(&mut rogue, Kind::Listener, &[]);
    let first = rogue.poll();
    assert!(first.iter().all(|o| o.resources.is_empty()), "{first:?}");
    assert!(rogue.lagging());
    // Even once it ACKs that empty answer.
    for o in &first {
        ack(&mut rogue, o);
    }
    assert!(rogue.lagging());
    // A real Envoy catches up.
    let both = [svc(80, "web", Mode::Http), svc(81, "web", Mode::Http)];
    let mut s = converge(Flavor::Sotw, &both);
    assert!(!s.lagging());
    // A changed listener: lagging until it is answered, even by a refusal.
    s.set_snapshot(snap(&[
        svc(80, "web", Mode::Http),
        svc(81, "web", Mode::Tcp),
    ]));
    assert!(s.lagging());
    let lds = one(&mut s);
    assert_eq!(lds.kind, Kind::Listener);
    let name = both[1].listener_name();
    s.on_request(
        Kind::Listener,
        Incoming {
            nonce: lds.nonce.clone(),
            error: Some(format!("cannot bind {name}: Address already in use")),
            ..Default::default()
        },
    );
    assert!(!s.lagging(), "a refused listener is answered");
}
