//! Unit tests of the registry: registrations, hand-over and take-back
//! orders, Envoy feedback, container labels, reaping.

use super::*;
use crate::mapping::Backend;
use crate::xds::session::Versions;

fn mapping(port: u16, backend: &str) -> Mapping {
    Mapping {
        key: MappingKey {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: port,
        },
        backend: Backend {
            container_ip: backend.parse().unwrap(),
            container_port: 80,
        },
    }
}

impl Registry {
    /// `register`, with the arrival spelt out.
    fn add(
        &mut self,
        mapping: Mapping,
        owner: OwnerProcess,
        conn: Option<u64>,
        server: Server,
        meta: Option<ContainerMeta>,
    ) -> Result<(), Refusal> {
        self.register(Arrival {
            mapping,
            owner,
            conn,
            server,
            meta,
        })
    }
}

fn me() -> OwnerProcess {
    OwnerProcess::of(std::process::id())
}

/// An ACK from `envoy` of everything of `kind` in the current snapshot.
/// The ACK names what it answered, as the session reports it, so the
/// registry re-judges just those mappings.
fn ack(r: &mut Registry, envoy: u64, kind: Kind) {
    let held: Versions = r
        .snapshots()
        .borrow()
        .get(kind)
        .iter()
        .map(|(n, res)| (n.clone(), res.version.clone()))
        .collect();
    let touched = Some(held.keys().cloned().collect());
    r.envoy_feedback(
        envoy,
        Feedback {
            kind,
            held,
            error: None,
            touched,
        },
    );
}

#[test]
fn an_ack_naming_one_mapping_settles_that_one_only() {
    let mut r = with_link(1);
    let envoy = r.envoy_connected(1);
    let (a, b) = (mapping(86, "10.0.0.2"), mapping(87, "10.0.0.3"));
    r.add(a, me(), Some(1), Server::Relay, None).unwrap();
    r.add(b, me(), Some(1), Server::Relay, None).unwrap();
    let snap = r.snapshots().borrow().clone();
    let versions = |kind: Kind| -> Versions {
        snap.get(kind)
            .iter()
            .map(|(n, res)| (n.clone(), res.version.clone()))
            .collect()
    };
    let cluster_of_a = snap.get(Kind::Listener)[&a.key.resource_name()]
        .cluster
        .clone()
        .unwrap();
    // Envoy holds everything, but the answers name only a's resources.
    for (kind, name) in [
        (Kind::Endpoint, cluster_of_a),
        (Kind::Listener, a.key.resource_name()),
    ] {
        r.envoy_feedback(
            envoy,
            Feedback {
                kind,
                held: versions(kind),
                error: None,
                touched: Some(vec![name]),
            },
        );
    }
    assert_eq!(orders(&mut r), [Server::Envoy]);
    assert_eq!(server_of(&r, 86), Server::Handover);
    assert_eq!(server_of(&r, 87), Server::Relay);
}

/// A registry without the reconnect grace, and one proxy connection.
fn with_link(conn: u64) -> Registry {
    let mut r = Registry::new(Mode::Http).with_grace(Duration::ZERO);
    r.link_opened(conn);
    r
}

/// The orders the registry has given since the last look.
fn orders(r: &mut Registry) -> Vec<Server> {
    r.take_outputs()
        .orders
        .into_iter()
        .map(|(_, reply)| match reply {
            Reply::Serve(s) => s,
            other => panic!("not an order: {other:?}"),
        })
        .collect()
}

fn server_of(r: &Registry, port: u16) -> Server {
    r.list()
        .iter()
        .find(|s| s.mapping.key.host_port == port)
        .unwrap()
        .server
}

#[test]
fn same_backend_is_a_no_op_and_another_is_a_conflict() {
    let mut r = Registry::new(Mode::Http);
    let rx = r.snapshots();
    r.add(mapping(80, "10.0.0.2"), me(), Some(1), Server::Relay, None)
        .unwrap();
    let v1 = rx.borrow().get(Kind::Listener).len();
    r.add(mapping(80, "10.0.0.2"), me(), Some(2), Server::Relay, None)
        .unwrap();
    assert_eq!(r.list().len(), 1);
    assert_eq!(v1, 1);
    let other = OwnerProcess::of(1);
    let err = r
        .add(mapping(80, "10.0.0.3"), other, None, Server::Relay, None)
        .unwrap_err();
    assert!(matches!(err, Refusal::Taken { .. }), "{err}");
    assert!(
        err.to_string().contains("already registered by pid"),
        "{err}"
    );
    // The connection that registered last owns it now.
    r.connection_closed(1);
    assert_eq!(r.list().len(), 1);
    r.connection_closed(2);
    assert!(r.list().is_empty());
}

#[test]
fn with_no_envoy_a_starting_proxy_is_told_to_relay_at_once() {
    let mut r = with_link(1);
    r.add(mapping(80, "10.0.0.2"), me(), Some(1), Server::Relay, None)
        .unwrap();
    assert_eq!(orders(&mut r), [Server::Relay]);
    assert_eq!(server_of(&r, 80), Server::Relay);
}

#[test]
fn a_range_relays_at_once_after_its_first_port_and_is_handed_over_together() {
    let mut r = with_link(1);
    let envoy = r.envoy_connected(1);
    r.add(
        mapping(20000, "10.0.0.2"),
        me(),
        Some(1),
        Server::Relay,
        None,
    )
    .unwrap();
    assert_eq!(orders(&mut r), [], "the first port waits for its hand-over");
    for port in 20001..20100 {
        r.add(
            mapping(port, "10.0.0.2"),
            me(),
            Some(1),
            Server::Relay,
            None,
        )
        .unwrap();
        assert_eq!(orders(&mut r), [Server::Relay], "port {port} goes at once");
    }
    // One ACK of everything hands every port over, the first and the rest.
    ack(&mut r, envoy, Kind::Listener);
    ack(&mut r, envoy, Kind::Endpoint);
    assert_eq!(orders(&mut r), vec![Server::Envoy; 100]);
}

#[test]
fn in_a_burst_of_containers_proxies_relay_at_once_and_are_handed_over_together() {
    let mut r = with_link(1);
    let envoy = r.envoy_connected(1);
    // One port per container: only the burst rule applies.
    let first = burst::COUNT as u16 - 1;
    for c in 0..100u16 {
        r.add(
            mapping(20000 + c, &format!("10.0.1.{c}")),
            me(),
            Some(1),
            Server::Relay,
            None,
        )
        .unwrap();
        let want: &[Server] = if c < first { &[] } else { &[Server::Relay] };
        assert_eq!(orders(&mut r), want, "container {c}");
    }
    ack(&mut r, envoy, Kind::Listener);
    ack(&mut r, envoy, Kind::Endpoint);
    assert_eq!(orders(&mut r), vec![Server::Envoy; 100]);
}

#[test]
fn hand_over_needs_listener_and_endpoints_then_take_back_when_envoy_goes() {
    let mut r = with_link(1);
    let envoy = r.envoy_connected(1);
    r.add(mapping(81, "10.0.0.2"), me(), Some(1), Server::Relay, None)
        .unwrap();
    assert_eq!(orders(&mut r), []);
    // The listener alone is not enough: its endpoints must be there too.
    ack(&mut r, envoy, Kind::Listener);
    assert_eq!(orders(&mut r), []);
    ack(&mut r, envoy, Kind::Endpoint);
    assert_eq!(orders(&mut r), [Server::Envoy]);
    assert_eq!(server_of(&r, 81), Server::Handover);
    r.serving(1, &mapping(81, "10.0.0.2").key, Server::Envoy, 0);
    assert_eq!(server_of(&r, 81), Server::Envoy);
    assert_eq!(r.list()[0].state, MappingState::Active);
    // The Envoy's stream ends: nobody holds the port, take it back.
    r.envoy_gone(envoy);
    assert_eq!(orders(&mut r), [Server::Relay]);
    assert_eq!(server_of(&r, 81), Server::Relay);
    // A new Envoy that holds nothing yet keeps the proxy relaying; its
    // ACKs hand the port over again.
    let again = r.envoy_connected(2);
    assert_eq!(orders(&mut r), []);
    ack(&mut r, again, Kind::Listener);
    ack(&mut r, again, Kind::Endpoint);
    assert_eq!(orders(&mut r), [Server::Envoy]);
}

#[test]
fn every_envoy_must_serve_before_hand_over_and_one_left_is_enough_to_stay() {
    let mut r = with_link(1);
    let a = r.envoy_connected(1);
    let b = r.envoy_connected(2);
    r.add(mapping(82, "10.0.0.2"), me(), Some(1), Server::Relay, None)
        .unwrap();
    ack(&mut r, a, Kind::Listener);
    ack(&mut r, a, Kind::Endpoint);
    assert_eq!(orders(&mut r), [], "b has not ACKed yet");
    ack(&mut r, b, Kind::Listener);
    ack(&mut r, b, Kind::Endpoint);
    assert_eq!(orders(&mut r), [Server::Envoy]);
    r.envoy_gone(a);
    assert_eq!(orders(&mut r), [], "b still listens on the port");
    r.envoy_gone(b);
    assert_eq!(orders(&mut r), [Server::Relay]);
}

#[test]
fn a_stalled_envoy_counts_neither_for_nor_against_a_hand_over() {
    let mut r = with_link(1);
    let real = r.envoy_connected(1);
    let rogue = r.envoy_connected(2);
    r.add(mapping(85, "10.0.0.2"), me(), Some(1), Server::Relay, None)
        .unwrap();
    ack(&mut r, real, Kind::Listener);
    ack(&mut r, real, Kind::Endpoint);
    assert_eq!(orders(&mut r), [], "the rogue has not ACKed");
    r.envoy_stalled(rogue, true);
    assert_eq!(orders(&mut r), [Server::Envoy]);
    assert_eq!(
        r.envoys()
            .iter()
            .filter(|e| e.stalled_secs.is_some())
            .count(),
        1
    );
    // The real one goes: a stalled peer that never said what it holds
    // does not keep the proxy from taking its port back.
    r.envoy_gone(real);
    assert_eq!(orders(&mut r), [Server::Relay]);
}

#[test]
fn a_restarted_registrar_leaves_handed_over_proxies_alone_during_the_grace() {
    let mut r = Registry::new(Mode::Http).with_grace(Duration::from_secs(3600));
    r.link_opened(1);
    // The proxy registers again, saying Envoy serves its port.
    r.add(mapping(83, "10.0.0.2"), me(), Some(1), Server::Envoy, None)
        .unwrap();
    assert_eq!(orders(&mut r), []);
    // An Envoy reconnects; until it says what it holds, it may hold it.
    let envoy = r.envoy_connected(1);
    assert_eq!(orders(&mut r), []);
    // It reports holding the listener (delta's initial versions).
    ack(&mut r, envoy, Kind::Listener);
    assert_eq!(orders(&mut r), []);
    assert_eq!(server_of(&r, 83), Server::Envoy);
}

#[test]
fn after_the_grace_a_proxy_with_no_envoy_takes_its_port_back() {
    let mut r = Registry::new(Mode::Http).with_grace(Duration::ZERO);
    r.link_opened(1);
    r.add(mapping(84, "10.0.0.2"), me(), Some(1), Server::Envoy, None)
        .unwrap();
    assert_eq!(orders(&mut r), [Server::Relay]);
}

#[test]
fn a_nack_marks_the_mapping_failed_and_keeps_it_relayed() {
    let mut r = with_link(1);
    let envoy = r.envoy_connected(1);
    let m = mapping(80, "10.0.0.2");
    r.add(m, me(), Some(1), Server::Relay, None).unwrap();
    let error = format!(
        "Error adding/updating listener(s) {}: cannot bind '0.0.0.0:80': Address already in use",
        m.key.resource_name()
    );
    r.envoy_feedback(
        envoy,
        Feedback {
            kind: Kind::Listener,
            held: Versions::new(),
            error: Some(error.clone()),
            touched: None,
        },
    );
    let rows = r.list();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, MappingState::Failed(error));
    assert_eq!(rows[0].server, Server::Relay);
    assert_eq!(orders(&mut r), []);
}

#[test]
fn container_labels_name_mappings_and_set_their_mode() {
    let mut r = Registry::new(Mode::Http);
    let rx = r.snapshots();
    let m = mapping(8080, "172.17.0.2");
    r.add(m, me(), Some(1), Server::Relay, None).unwrap();
    assert_eq!(r.list()[0].name, "172-17-0-2-80");
    let meta = ContainerMeta {
        id: "c1".into(),
        name: "web1".into(),
        image: "busybox".into(),
        labels: [
            ("ServiceName".to_string(), "web".to_string()),
            ("EnvironmentName".to_string(), "prod".to_string()),
            ("ProxyMode".to_string(), "tcp".to_string()),
        ]
        .into(),
        ips: vec!["172.17.0.2".parse().unwrap()],
        ports: vec![(80, Proto::Tcp)],
        ..Default::default()
    };
    r.apply_container(meta.clone());
    let s = &r.list()[0];
    assert_eq!((s.name.as_str(), s.mode), ("web-prod", Mode::Tcp));
    assert_eq!(s.container.as_ref().unwrap().name, "web1");
    assert!(rx
        .borrow()
        .get(Kind::Cluster)
        .contains_key("web-prod_tcp_0-0-0-0_8080"));
    // A second mapping of the same container is named at once.
    r.add(
        mapping(8081, "172.17.0.2"),
        me(),
        Some(1),
        Server::Relay,
        None,
    )
    .unwrap();
    assert!(r.list().iter().all(|s| s.name == "web-prod"));
    // Another container reusing the address takes over.
    let mut next = meta;
    next.id = "c2".into();
    next.name = "other".into();
    next.labels.clear();
    r.apply_container(next);
    assert!(r
        .list()
        .iter()
        .all(|s| s.name == "other" && s.mode == Mode::Http));
}

#[test]
fn dead_owners_are_reaped_and_sctp_is_refused() {
    let mut r = Registry::new(Mode::Http);
    let dead = OwnerProcess {
        pid: u32::MAX - 1,
        start: None,
    };
    r.add(mapping(80, "10.0.0.2"), dead, None, Server::Relay, None)
        .unwrap();
    r.add(mapping(81, "10.0.0.2"), me(), None, Server::Relay, None)
        .unwrap();
    r.reap();
    assert_eq!(r.list().len(), 1);
    let mut m = mapping(82, "10.0.0.2");
    m.key.proto = Proto::Sctp;
    assert!(r.add(m, me(), None, Server::Relay, None).is_err());
}

#[test]
fn a_port_label_sets_that_ports_mode_and_proxy_protocol_only_applies_to_tcp() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use prost::Message;
    let mut r = Registry::new(Mode::Auto);
    let rx = r.snapshots();
    let mut db = mapping(5433, "172.17.0.3");
    db.backend.container_port = 5432;
    for m in [mapping(8080, "172.17.0.3"), db] {
        r.add(m, me(), Some(1), Server::Relay, None).unwrap();
    }
    assert!(r.list().iter().all(|s| s.mode == Mode::Auto));
    let labels = [
        ("ProxyMode", "http"),
        ("ProxyMode_5432", "tcp"),
        ("ProxyProtocol", "v2"),
    ];
    r.apply_container(ContainerMeta {
        id: "c3".into(),
        name: "both".into(),
        image: "busybox".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec!["172.17.0.3".parse().unwrap()],
        ports: vec![(80, Proto::Tcp), (5432, Proto::Tcp)],
        ..Default::default()
    });
    let mode_of = |port: u16| {
        r.list()
            .into_iter()
            .find(|s| s.mapping.key.host_port == port)
            .unwrap()
            .mode
    };
    assert_eq!((mode_of(8080), mode_of(5433)), (Mode::Http, Mode::Tcp));
    let snap = rx.borrow().clone();
    let cluster =
        |name: &str| Cluster::decode(snap.get(Kind::Cluster)[name].any.value.as_slice()).unwrap();
    assert!(cluster("both_tcp_0-0-0-0_5433").transport_socket.is_some());
    assert!(cluster("both_tcp_0-0-0-0_8080").transport_socket.is_none());
}

/// Registers a relaying mapping of port `port` to `ip`:80.
fn relayed(r: &mut Registry, port: u16, ip: &str) {
    r.add(mapping(port, ip), me(), Some(1), Server::Relay, None)
        .unwrap();
}

fn labelled(id: &str, ip: &str, labels: &[(&str, &str)]) -> ContainerMeta {
    ContainerMeta {
        id: id.into(),
        name: format!("{id}-name"),
        image: "busybox".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    }
}

#[test]
fn fleet_instances_follow_mappings_containers_and_health() {
    let mut r = Registry::new(Mode::Auto).with_fleet("host-a".into(), "10.9.0.1".parse().unwrap());
    let mut local = r.fleet_instances().unwrap();
    let web = [("ServiceName", "web"), ("ServicePort_80", "10080")];
    r.apply_container(labelled("c1", "172.17.0.2", &web));
    r.apply_container(labelled(
        "c2",
        "172.17.0.3",
        &[("ServiceName", "quiet"), ("SidecarDiscover", "false")],
    ));
    relayed(&mut r, 8080, "172.17.0.2");
    relayed(&mut r, 8081, "172.17.0.3");
    // Unknown container, loopback, and `::` with an IPv4 advertise: none.
    relayed(&mut r, 8082, "172.17.0.9");
    for ip in ["127.0.0.1", "::"] {
        let mut m = mapping(8080, "172.17.0.2");
        m.key.host_ip = ip.parse().unwrap();
        r.add(m, me(), Some(1), Server::Relay, None).unwrap();
    }
    assert!(local.has_changed().unwrap());
    let now = local.borrow_and_update().clone();
    assert_eq!(now.len(), 1, "{now:?}");
    let (key, i) = now.iter().next().unwrap();
    assert_eq!(
        key,
        "/envoy-docker/v1/instances/web/host-a/tcp_0-0-0-0_8080"
    );
    assert_eq!(i.address.to_string(), "10.9.0.1:8080");
    assert_eq!(i.service_port, Some(10080));
    assert_eq!(i.health, crate::catalog::Health::Healthy);
    assert_eq!(i.container.name, "c1-name");

    // Docker's HEALTHCHECK turns unhealthy: the instance says so.
    let mut sick = labelled("c1", "172.17.0.2", &web);
    sick.health = Some(crate::catalog::Health::Unhealthy);
    r.apply_container(sick);
    assert!(local.has_changed().unwrap());
    let i = local.borrow_and_update().values().next().unwrap().clone();
    assert_eq!(i.health, crate::catalog::Health::Unhealthy);

    // The mapping goes: so does the instance.
    r.deregister(&mapping(8080, "172.17.0.2").key, oneshot::channel().0);
    assert!(local.borrow_and_update().is_empty());
}

#[test]
fn egress_follows_the_catalog_and_local_instances_once_it_has_an_address() {
    let mut r = Registry::new(Mode::Auto).with_fleet("host-a".into(), "10.9.0.1".parse().unwrap());
    let rx = r.snapshots();
    let remote = crate::catalog::Instance {
        service: "web".into(),
        environment: None,
        host_id: "host-b".into(),
        address: "10.9.0.2:8080".parse().unwrap(),
        mode: Mode::Http,
        container: crate::catalog::ContainerInfo {
            name: "web-b".into(),
            id: "b1".into(),
        },
        image: "busybox".into(),
        health: crate::catalog::Health::Healthy,
        service_port: Some(10080),
        mesh_port: None,
        check: None,
    };
    let catalog: fleet::Instances = Arc::new(
        [(
            "/envoy-docker/v1/instances/web/host-b/tcp_0-0-0-0_8080".to_string(),
            remote,
        )]
        .into(),
    );
    r.set_catalog(catalog.clone());
    assert!(
        !rx.borrow().get(Kind::Listener).contains_key("egress_10080"),
        "no address yet"
    );
    r.set_egress_ip(Some("172.17.0.1".parse().unwrap()));
    let cluster = "egress-web_tcp_172-17-0-1_10080";
    {
        let snap = rx.borrow();
        assert!(snap.get(Kind::Listener).contains_key("egress_10080"));
        assert!(snap.get(Kind::Cluster).contains_key(cluster));
        assert!(snap.get(Kind::Endpoint).contains_key(cluster));
    }
    let before = rx.borrow().get(Kind::Endpoint)[cluster].version.clone();
    // A local instance of the same service joins the assignment.
    r.apply_container(labelled(
        "c1",
        "172.17.0.2",
        &[("ServiceName", "web"), ("ServicePort_80", "10080")],
    ));
    relayed(&mut r, 8080, "172.17.0.2");
    assert_ne!(rx.borrow().get(Kind::Endpoint)[cluster].version, before);
    // The catalog empties and the local instance goes: so does egress.
    r.set_catalog(Arc::default());
    r.deregister(&mapping(8080, "172.17.0.2").key, oneshot::channel().0);
    assert!(!rx.borrow().get(Kind::Listener).contains_key("egress_10080"));
    // Moving egress moves the listener.
    r.set_catalog(catalog);
    r.set_egress_ip(Some("172.18.0.1".parse().unwrap()));
    let snap = rx.borrow();
    assert!(snap
        .get(Kind::Cluster)
        .contains_key("egress-web_tcp_172-18-0-1_10080"));
    assert!(!snap.get(Kind::Cluster).contains_key(cluster));
}

#[test]
fn a_port_is_handed_over_only_once_the_table_claims_it_and_claims_follow_mappings() {
    let mut r = with_link(1);
    let claims = r.claims();
    // Ports are claimed in nftables, so far for nothing.
    r.claims_applied(Some(Claims::new()));
    let envoy = r.envoy_connected(1);
    let m = mapping(88, "10.0.0.4");
    r.add(m, me(), Some(1), Server::Relay, None).unwrap();
    assert!(
        claims.borrow().contains(&m.key),
        "the registry asks for the claim"
    );
    for kind in [Kind::Cluster, Kind::Endpoint, Kind::Listener] {
        ack(&mut r, envoy, kind);
    }
    // Envoy serves it, but the table does not claim it yet.
    assert_eq!(orders(&mut r), []);
    r.claims_applied(Some(claims.borrow().clone()));
    assert_eq!(orders(&mut r), [Server::Envoy]);
    // Nothing claims a port no mapping holds.
    r.connection_closed(1);
    assert!(claims.borrow().is_empty());
}

#[test]
fn without_a_claiming_table_hand_overs_go_ahead() {
    let mut r = with_link(1);
    r.claims_applied(None);
    let envoy = r.envoy_connected(1);
    r.add(mapping(89, "10.0.0.5"), me(), Some(1), Server::Relay, None)
        .unwrap();
    for kind in [Kind::Cluster, Kind::Endpoint, Kind::Listener] {
        ack(&mut r, envoy, kind);
    }
    assert_eq!(orders(&mut r), [Server::Envoy]);
}
