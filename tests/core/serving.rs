//! Serving traffic: HTTP and TCP mode, many mappings, UDP, dual stack and
//! dockerd's pre-bound sockets.

use crate::harness::{backend, free_port, http_get, Ads, ProxySpec, Stack};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::Duration;

#[test]
fn http_mode_serves_the_first_request_after_ready_and_counts_it() {
    let stack = Stack::start_with(Ads::Sotw, &["--default-mode", "http"]);
    let be = backend::http("127.0.0.2", "hello from http backend");
    let port = free_port();
    let _p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    let (code, body) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/x").unwrap();
    assert_eq!((code, body.as_str()), (200, "hello from http backend"));

    let rows = stack.status();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["mode"], "http");
    assert_eq!(rows[0]["state"], "active");
    let name = rows[0]["name"].as_str().unwrap();
    let prefix = format!("{name}_tcp_127-0-0-1_{port}");
    assert_eq!(
        stack.stat(&format!("http.{prefix}.downstream_rq_2xx")),
        Some(1)
    );
    assert!(stack.listeners().contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn tcp_mode_over_delta_ads_proxies_bytes_and_counts_them() {
    let stack = Stack::start_with(Ads::Delta, &["--default-mode", "tcp"]);
    let be = backend::http("127.0.0.3", "hello over tcp_proxy");
    let port = free_port();
    let _p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    let (code, body) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "hello over tcp_proxy"));
    let rows = stack.status();
    assert_eq!(rows[0]["mode"], "tcp");
    let prefix = format!("{}_tcp_127-0-0-1_{port}", rows[0]["name"].as_str().unwrap());
    assert_eq!(
        stack.stat(&format!("tcp.{prefix}.downstream_cx_total")),
        Some(1)
    );
    assert_eq!(
        stack.stat(&format!("http.{prefix}.downstream_rq_2xx")),
        None
    );
}

#[test]
fn fifty_mappings_registered_concurrently_are_all_served() {
    let stack = Stack::start(Ads::Delta);
    let mut wanted = Vec::new();
    for i in 0..50 {
        let body = format!("backend {i}");
        wanted.push((free_port(), backend::http("127.0.0.4", &body), body));
    }
    let proxies: Vec<_> = wanted
        .iter()
        .map(|(port, be, _)| stack.proxy(ProxySpec::tcp("127.0.0.1", *port, *be)))
        .collect();
    let proxies: Vec<_> = proxies.into_iter().map(|p| p.ready()).collect();
    for (port, _, body) in &wanted {
        let got = http_get(SocketAddr::from(([127, 0, 0, 1], *port)), "/").unwrap();
        assert_eq!(got, (200, body.clone()), "port {port}");
    }
    assert_eq!(stack.status().len(), 50);
    drop(proxies);
}

fn udp_round_trip(client: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    client.send_to(msg, to).unwrap();
    let mut buf = vec![0u8; 70000];
    let (n, _) = client.recv_from(&mut buf).expect("no UDP echo");
    buf.truncate(n);
    buf
}

fn udp_client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c
}

#[test]
fn udp_is_relayed_for_two_clients_at_once_and_registered() {
    let stack = Stack::start(Ads::Sotw);
    let echo = backend::udp_echo("127.0.0.5");
    let port = free_port();
    let spec = ProxySpec::mapping("udp", "127.0.0.1", port, "127.0.0.5", echo.port());
    let _p = stack.proxy(spec).ready();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let c = udp_client();
                for round in 0..20 {
                    let msg = format!("client {i} round {round}");
                    assert_eq!(udp_round_trip(&c, to, msg.as_bytes()), msg.as_bytes());
                }
                // The largest datagram docker-proxy relays.
                let big = vec![i as u8; 65507];
                assert_eq!(udp_round_trip(&c, to, &big).len(), 65507);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rows = stack.status();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["proto"], "udp");
    assert_eq!(rows[0]["state"], "active");
    // UDP gets no Envoy config.
    assert!(!stack.listeners().contains(&format!(":{port}")));
}

#[test]
fn dual_stack_proxies_of_one_port_both_serve_as_two_listeners() {
    let stack = Stack::start(Ads::Delta);
    let be = backend::http("127.0.0.6", "dual");
    let port = free_port();
    let _v4 = stack.proxy(ProxySpec::tcp("0.0.0.0", port, be)).ready();
    let _v6 = stack.proxy(ProxySpec::tcp("::", port, be)).ready();
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], port)),
        format!("[::1]:{port}").parse().unwrap(),
    ] {
        assert_eq!(http_get(addr, "/").unwrap(), (200, "dual".into()), "{addr}");
    }
    let listeners = stack.listeners();
    assert!(
        listeners.contains(&format!("tcp_0-0-0-0_{port}::0.0.0.0:{port}")),
        "{listeners}"
    );
    assert!(
        listeners.contains(&format!("tcp_--_{port}::[::]:{port}")),
        "{listeners}"
    );
}

#[test]
fn use_listen_fd_works_for_tcp_and_udp_as_docker_28_passes_them() {
    let stack = Stack::start(Ads::Sotw);

    // TCP: dockerd bound and listens; the proxy must let go so Envoy binds.
    let be = backend::http("127.0.0.7", "via listen fd");
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut spec = ProxySpec::tcp("127.0.0.1", port, be);
    spec.args.push("-use-listen-fd".into());
    spec.listen_fd = Some(OwnedFd::from(listener));
    let _tcp = stack.proxy(spec).ready();
    let got = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
    assert_eq!(got, (200, "via listen fd".into()));

    // UDP: the proxy relays on the very socket it was given.
    let echo = backend::udp_echo("127.0.0.7");
    let uport = free_port();
    let sock = UdpSocket::bind(("127.0.0.1", uport)).unwrap();
    let mut spec = ProxySpec::mapping("udp", "127.0.0.1", uport, "127.0.0.7", echo.port());
    spec.args.push("--use-listen-fd".into());
    spec.listen_fd = Some(OwnedFd::from(sock));
    let _udp = stack.proxy(spec).ready();
    let c = udp_client();
    let to = SocketAddr::from(([127, 0, 0, 1], uport));
    assert_eq!(udp_round_trip(&c, to, b"ping"), b"ping");
}

#[test]
fn two_envoys_sotw_and_delta_get_the_same_resources_and_both_must_ack() {
    let mut stack = Stack::start(Ads::Sotw);
    let second = stack.add_envoy(Ads::Delta);
    let be = backend::http("127.0.0.18", "both");
    let port = free_port();
    let _p = stack.proxy(ProxySpec::tcp("127.0.0.1", port, be)).ready();
    // Ready means both Envoys hold the listener (they share the port with
    // SO_REUSEPORT, as Envoy does by default).
    for admin in [stack.admin, second] {
        let listeners = crate::harness::admin_get(admin, "/listeners");
        assert!(
            listeners.contains(&format!("127.0.0.1:{port}")),
            "{admin}: {listeners}"
        );
    }
    for _ in 0..10 {
        let got = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
        assert_eq!(got, (200, "both".into()));
    }
}

/// Issue 10: a host's worth of mappings in both ADS flavors, every one
/// served by Envoy, then a fifth of them removed and gone from Envoy.
#[test]
fn a_thousand_mappings_are_served_in_delta_and_sotw_and_two_hundred_removals_reach_envoy() {
    use crate::harness::{admin_get, refused, wait_until};
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Envoy (started from here) needs a descriptor per listener, and this
    // process two per proxy.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let be = backend::http("127.0.0.6", "one of many");
    for ads in [Ads::Delta, Ads::Sotw] {
        let stack = Stack::start(ads);
        let ports: Vec<u16> = (0..1000).map(|_| free_port()).collect();
        // All at once, as a host booting with restart policies starts them.
        let proxies: Vec<_> = ports
            .iter()
            .map(|p| stack.proxy(ProxySpec::tcp("127.0.0.1", *p, be)))
            .collect();
        let mut proxies: Vec<_> = proxies.into_iter().map(|p| p.ready()).collect();
        assert!(
            stack.wait_served_by(&ports, "envoy", Duration::from_secs(90)),
            "{ads:?}: not every mapping reached Envoy"
        );
        for port in &ports {
            let got = http_get(SocketAddr::from(([127, 0, 0, 1], *port)), "/").unwrap();
            assert_eq!(got, (200, "one of many".to_string()), "{ads:?} port {port}");
        }
        // Each request was Envoy's: one 2xx in each listener's HTTP stats,
        // or, when a busy Envoy let the sniff timeout run out before it
        // read the request, one connection in its tcp_proxy stats.
        let stats = admin_get(
            stack.admin,
            "/stats?filter=(downstream_rq_2xx|downstream_cx_total)$",
        );
        let served: u64 = stats
            .lines()
            .filter(|l| {
                (l.starts_with("http.") && l.contains("downstream_rq_2xx"))
                    || (l.starts_with("tcp.") && l.contains("downstream_cx_total"))
            })
            .filter(|l| !l.starts_with("http.admin"))
            .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
            .sum();
        assert_eq!(served, 1000, "{ads:?}");

        // A fifth go away, as containers stop.
        let (gone, kept) = ports.split_at(200);
        let mut stopped: Vec<_> = proxies.drain(..200).collect();
        for p in &stopped {
            p.signal(nix::sys::signal::Signal::SIGINT);
        }
        for p in &mut stopped {
            assert!(p.wait_exit(Duration::from_secs(10)).is_some());
        }
        let all_gone = wait_until(Duration::from_secs(30), || {
            let listeners = stack.listeners();
            let held: std::collections::HashSet<&str> = listeners
                .lines()
                .filter_map(|l| l.rsplit("::").next())
                .collect();
            gone.iter()
                .all(|p| !held.contains(format!("127.0.0.1:{p}").as_str()))
        });
        assert!(all_gone, "{ads:?}: removed listeners are still in Envoy");
        // Envoy lists a listener as gone a moment before its workers close
        // the socket: wait for that, bounded.
        let open: Vec<u16> = gone
            .iter()
            .copied()
            .filter(|port| {
                !wait_until(Duration::from_secs(10), || {
                    refused(SocketAddr::from(([127, 0, 0, 1], *port)))
                })
            })
            .collect();
        assert!(open.is_empty(), "{ads:?}: still accepting on {open:?}");
        assert_eq!(stack.status().len(), 800, "{ads:?}");
        assert!(stack.wait_served_by(kept, "envoy", Duration::from_secs(10)));
        let port = kept[kept.len() / 2];
        let got = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/").unwrap();
        assert_eq!(got.0, 200);
        drop(proxies);
    }
}
