//! Unit tests of the stream state machine: requests in, responses out.

use super::*;
use crate::mapping::{Backend, MappingKey, Mode, Proto};
use crate::xds::resource::Service;

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
        proxy_protocol: None,
        image: None,
    }
}

fn snap(services: &[Service]) -> Arc<Snapshot> {
    Arc::new(Snapshot::build(
        services,
        &Default::default(),
        &Default::default(),
    ))
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
            // As Envoy does: an ACK repeats the whole subscription.
            names: s.types[out.kind as usize].names.iter().cloned().collect(),
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
    let mut sorted = clusters.clone();
    sorted.sort();
    assert_eq!(names(&eds), sorted);
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
    let mut s = Session::new(Flavor::Delta, snap(std::slice::from_ref(&new)));
    reconnect_delta(&mut s, &live, &[old.cluster_name(), new.cluster_name()]);
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

/// A delta Envoy reconnecting to `s`: its first request of each type
/// reports what it held on `live`, and it asks for `clusters`' endpoints.
fn reconnect_delta(s: &mut Session, live: &Session, clusters: &[String]) {
    for kind in Kind::ORDER {
        let subscribe = if kind == Kind::Endpoint {
            clusters.to_vec()
        } else {
            vec![]
        };
        let initial_versions = live.types[kind as usize].acked.clone();
        s.on_request(
            kind,
            Incoming {
                subscribe,
                initial_versions: initial_versions.into_iter().collect(),
                ..Default::default()
            },
        );
    }
}

/// Many services, so that a change has plenty to be compared with.
fn many(n: u16) -> Vec<Service> {
    (0..n)
        .map(|i| svc(10000 + i, &format!("s{i}"), Mode::Tcp))
        .collect()
}

/// Drives the stream until nothing more goes out, ACKing everything;
/// returns every response, in order.
fn drain(s: &mut Session) -> Vec<Outgoing> {
    let mut all = Vec::new();
    loop {
        let out = s.poll();
        if out.is_empty() {
            return all;
        }
        for o in &out {
            ack(s, o);
        }
        all.extend(out);
    }
}

fn sent_of(all: &[Outgoing], kind: Kind) -> (Vec<String>, Vec<String>) {
    let of = all.iter().filter(|o| o.kind == kind);
    let resources = of.clone().flat_map(names).collect();
    let removed = of.flat_map(|o| o.removed.clone()).collect();
    (resources, removed)
}

#[test]
fn one_change_sends_that_resource_and_its_dependants_only() {
    for flavor in [Flavor::Delta, Flavor::Sotw] {
        let mut services = many(200);
        let mut s = converge(flavor, &services);
        let all_clusters: Vec<String> = services.iter().map(|x| x.cluster_name()).collect();

        // A new backend for one service: its assignment only.
        services[7].backend.container_ip = "10.0.0.9".parse().unwrap();
        s.set_snapshot(snap(&services));
        let out = drain(&mut s);
        assert_eq!(
            sent_of(&out, Kind::Endpoint).0,
            [services[7].cluster_name()]
        );
        assert!(
            out.iter().all(|o| o.kind == Kind::Endpoint),
            "{flavor:?} {out:?}"
        );

        // A new service: its cluster, its assignment, then its listener.
        let extra = svc(9999, "extra", Mode::Http);
        services.push(extra.clone());
        s.set_snapshot(snap(&services));
        let mut out = drain(&mut s);
        let mut names_now = all_clusters.clone();
        names_now.push(extra.cluster_name());
        let refs: Vec<&str> = names_now.iter().map(String::as_str).collect();
        subscribe(&mut s, Kind::Endpoint, &refs);
        out.extend(drain(&mut s));
        assert_eq!(sent_of(&out, Kind::Endpoint).0, [extra.cluster_name()]);
        match flavor {
            Flavor::Delta => {
                assert_eq!(sent_of(&out, Kind::Cluster).0, [extra.cluster_name()]);
                assert_eq!(sent_of(&out, Kind::Listener).0, [extra.listener_name()]);
            }
            // SotW must repeat every cluster and listener, but each once.
            Flavor::Sotw => {
                assert_eq!(sent_of(&out, Kind::Cluster).0.len(), 201);
                assert_eq!(sent_of(&out, Kind::Listener).0.len(), 201);
            }
        }

        // Removal: the listener first, then its cluster, then (with the
        // cluster gone) its assignment; nothing else is sent.
        services.pop();
        s.set_snapshot(snap(&services));
        let out = drain(&mut s);
        let kinds: Vec<Kind> = out.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Listener, Kind::Cluster, Kind::Endpoint],
            "{flavor:?}"
        );
        assert!(out[2].resources.is_empty());
        if flavor == Flavor::Delta {
            assert!(out.iter().all(|o| o.resources.is_empty()));
            assert_eq!(out[0].removed, [extra.listener_name()]);
            assert_eq!(out[1].removed, [extra.cluster_name()]);
            assert_eq!(out[2].removed, [extra.cluster_name()]);
        }
        assert!(!s.lagging());
    }
}

#[test]
fn versions_do_not_depend_on_order_or_process_state() {
    let services = many(50);
    let mut reversed = services.clone();
    reversed.reverse();
    let (a, b) = (snap(&services), snap(&reversed));
    for kind in Kind::ORDER {
        let versions = |s: &Snapshot| -> Vec<(String, String)> {
            s.get(kind)
                .iter()
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect()
        };
        assert_eq!(versions(&a), versions(&b));
        assert_eq!(sotw_version(a.get(kind)), sotw_version(b.get(kind)));
    }
    // Pinned: the same inputs give the same versions in every process, so
    // a restarted registrar finds Envoy up to date. A builder change that
    // moves them must do so on purpose (and make every Envoy re-fetch).
    let web = snap(&[svc(8080, "web", Mode::Tcp)]);
    let got: Vec<String> = Kind::ORDER
        .iter()
        .map(|k| web.get(*k).values().next().unwrap().version.clone())
        .collect();
    assert_eq!(got, PINNED, "versions moved");
}

const PINNED: [&str; 3] = ["e83abc70713eca69", "fc0582c1ff8c07dd", "b0fd4ac819c30d56"];

#[test]
fn a_delta_reconnect_gets_only_what_differs_from_what_envoy_holds() {
    let mut services = many(100);
    let live = converge(Flavor::Delta, &services);
    // While the stream was down: one service changed backend, one went,
    // one came.
    services[3].backend.container_ip = "10.0.0.7".parse().unwrap();
    let gone = services.remove(5);
    let came = svc(9000, "came", Mode::Tcp);
    services.push(came.clone());
    let mut s = Session::new(Flavor::Delta, snap(&services));
    let clusters: Vec<String> = services.iter().map(|x| x.cluster_name()).collect();
    reconnect_delta(&mut s, &live, &clusters);
    let out = drain(&mut s);
    assert_eq!(sent_of(&out, Kind::Cluster).0, [came.cluster_name()]);
    assert_eq!(
        sent_of(&out, Kind::Endpoint).0,
        [came.cluster_name(), services[3].cluster_name()]
    );
    assert_eq!(sent_of(&out, Kind::Listener).0, [came.listener_name()]);
    assert_eq!(sent_of(&out, Kind::Listener).1, [gone.listener_name()]);
    assert_eq!(sent_of(&out, Kind::Cluster).1, [gone.cluster_name()]);
    assert!(!s.lagging());
}

#[test]
fn secrets_go_by_name_first_and_again_when_they_change() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    // The body differs by version, so the content hash does.
    let secret = |name: &str, body: &str| {
        Arc::new(Resource::new(
            name.into(),
            Secret {
                name: format!("{name}{body}"),
                ..Default::default()
            },
            None,
        ))
    };
    for flavor in [Flavor::Sotw, Flavor::Delta] {
        let mut snapshot = (*snap(&[svc(8080, "web", Mode::Tcp)])).clone();
        snapshot.set(Kind::Secret, secret("a", "1"));
        snapshot.set(Kind::Secret, secret("b", "1"));
        let mut s = Session::new(flavor, Arc::new(snapshot.clone()));
        subscribe(&mut s, Kind::Secret, &["a", "missing"]);
        let out = one(&mut s);
        assert_eq!(
            (out.kind, names(&out)),
            (Kind::Secret, vec!["a".to_string()])
        );
        ack(&mut s, &out);
        assert!(s.poll().is_empty(), "{flavor:?}");
        // A rotation of a secret Envoy holds goes out; one it does not
        // want does not.
        snapshot.set(Kind::Secret, secret("a", "2"));
        snapshot.set(Kind::Secret, secret("b", "2"));
        s.set_snapshot(Arc::new(snapshot.clone()));
        let out = one(&mut s);
        assert_eq!(names(&out), ["a"], "{flavor:?}");
    }
}
