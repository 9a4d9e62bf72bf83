//! The fleet against real parts: the etcd client and the catalog's records
//! on one etcd on loopback (here); three Docker hosts as network
//! namespaces (`hosts`), each with its own dockerd, registrar, Envoy and
//! etcd member, shared by the scenarios in `three_hosts`; and an etcd
//! member cut off by a partition (`partition`).

mod hosts;
mod mesh;
mod mesh_bench;
mod partition;
mod three_hosts;

use crate::harness::{free_port, wait_until, TempDir};
use envoy_docker::catalog::{self, ContainerInfo, Health, Instance};
use envoy_docker::etcd::{Etcd, Event, Write};
use envoy_docker::mapping::Mode;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One etcd member on 127.0.0.1, killed on drop.
struct EtcdServer {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl EtcdServer {
    fn start() -> EtcdServer {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path("data"))
            .args(["--name", "m1"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m1={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("etcd.log")).unwrap())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let probe = url.clone();
        assert!(
            wait_until(Duration::from_secs(20), || {
                Command::new("etcdctl")
                    .args(["--endpoints", &probe, "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output()
                    .is_ok_and(|o| o.status.success())
            }),
            "etcd did not start"
        );
        EtcdServer {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance(host: &str, port: u16) -> Instance {
    Instance {
        service: "web".into(),
        environment: None,
        host_id: host.into(),
        address: format!("10.0.0.1:{port}").parse().unwrap(),
        mode: Mode::Http,
        container: ContainerInfo {
            name: "web1".into(),
            id: "abc".into(),
        },
        image: "nginx".into(),
        health: Health::Healthy,
        service_port: Some(10080),
        mesh_port: None,
        check: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn etcd_client_leases_and_catalog_records_on_a_real_etcd() {
    let server = EtcdServer::start();
    // A dead member first: the client goes on to the live one.
    let etcd = Etcd::connect(&format!("http://127.0.0.1:1,{}", server.url))
        .await
        .unwrap();

    let lease = etcd.grant(10).await.unwrap();
    let mut kept = etcd.keep_alive(lease).await.unwrap().expect("a live lease");
    assert!(kept.renew().await.unwrap() > 0);
    let a = instance("host-a", 8080);
    let b = instance("host-b", 8081);
    let key_a = catalog::key("web", "host-a", "tcp_0-0-0-0_8080").unwrap();
    let key_b = catalog::key("web", "host-b", "tcp_0-0-0-0_8081").unwrap();
    etcd.put(&key_a, &catalog::encode(&a), lease).await.unwrap();
    etcd.put(&key_b, &catalog::encode(&b), 0).await.unwrap();
    etcd.put("/envoy-docker/v1/instancesX", b"outside", 0)
        .await
        .unwrap();

    let (rev, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert!(rev > 0);
    assert_eq!(kvs.len(), 2, "{kvs:?}");
    assert_eq!(kvs[0].key, key_a);
    assert_eq!(kvs[0].lease, lease);
    assert_eq!(catalog::decode(&kvs[0].value).unwrap(), a);
    assert_eq!(catalog::decode(&kvs[1].value).unwrap(), b);
    // etcdctl, the operator's view, reads the same JSON.
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &server.url,
            "get",
            &key_b,
            "--print-value-only",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert_eq!(
        catalog::decode(String::from_utf8_lossy(&out.stdout).trim().as_bytes()).unwrap(),
        b
    );

    // Revoking the lease takes its keys with it; the other stays.
    etcd.revoke(lease).await.unwrap();
    assert_eq!(kept.renew().await.unwrap(), 0);
    assert!(etcd.keep_alive(lease).await.unwrap().is_none());
    let (_, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        [key_b.as_str()]
    );
    etcd.delete(&key_b).await.unwrap();
    assert!(etcd.get_prefix(catalog::PREFIX).await.unwrap().1.is_empty());

    // A lease nobody keeps alive expires, and its keys go.
    let short = etcd.grant(1).await.unwrap();
    etcd.put(&key_a, b"{}", short).await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if etcd.get_prefix(catalog::PREFIX).await.unwrap().1.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the key outlived its lease");

    // A watch from the revision after a read sees every change, in order.
    let (rev, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    let mut watch = etcd.watch_prefix(catalog::PREFIX, rev + 1).await.unwrap();
    etcd.put(&key_a, &catalog::encode(&a), 0).await.unwrap();
    etcd.put("/elsewhere", b"not watched", 0).await.unwrap();
    etcd.delete(&key_a).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (_, events) = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("no watch event in 10 s")
            .unwrap();
        seen.extend(events);
    }
    match &seen[0] {
        Event::Put(kv) => {
            assert_eq!(kv.key, key_a);
            assert_eq!(catalog::decode(&kv.value).unwrap(), a);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(seen[1], Event::Delete(key_a.clone()));
    // History etcd has compacted away is an error that says so.
    let (now, _) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    let out = Command::new("etcdctl")
        .args(["--endpoints", &server.url, "compact", &now.to_string()])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut old = etcd.watch_prefix(catalog::PREFIX, rev).await.unwrap();
    assert!(matches!(
        old.next().await,
        Err(envoy_docker::etcd::Error::Compacted(_))
    ));

    // More writes than one transaction takes go in several, in order.
    let many: Vec<Write> = (0..300)
        .map(|i| Write::Put(format!("{}batch/{i:03}", catalog::PREFIX), b"x".to_vec()))
        .chain((0..150).map(|i| Write::Delete(format!("{}batch/{i:03}", catalog::PREFIX))))
        .collect();
    etcd.write(&many, 0).await.unwrap();
    let (_, kvs) = etcd.get_prefix(catalog::PREFIX).await.unwrap();
    assert_eq!(kvs.len(), 150);
    assert!(kvs[0].key.ends_with("batch/150"), "{:?}", kvs[0]);

    // etcd's own refusals are errors, not panics.
    assert!(etcd.put(&key_a, b"x", 12345).await.is_err());
    drop(server);
    assert!(etcd.grant(5).await.is_err());
}
