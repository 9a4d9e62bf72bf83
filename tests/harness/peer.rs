//! Misbehaving peers, run as another user (uid 65534) as a local attacker
//! would: a rogue ADS client (the test binary runs itself again for it),
//! idle connection floods and half-sent frames (small Python scripts).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

pub const NOBODY: u32 = 65534;

/// How the rogue ADS client behaves once its first request is in.
#[derive(Debug, Clone, Copy)]
pub enum Rogue {
    /// Asks for clusters and listeners, then never answers anything.
    Silent,
    /// Plays along with clusters and endpoints, and refuses every listener
    /// with Envoy's own "Address already in use" text.
    Nack,
}

/// Starts the rogue ADS client against `xds` as uid 65534.
pub fn rogue_ads(xds: SocketAddr, how: Rogue) -> Child {
    let me = std::env::current_exe().unwrap();
    Command::new(me)
        .args([
            "--exact",
            "harness::peer::rogue_ads_peer",
            "--ignored",
            "--nocapture",
        ])
        .env("ED_ROGUE", format!("{xds} {how:?}"))
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The rogue client itself; a helper that other tests start in a process
/// of its own, under another uid. Run alone it has nothing to do.
#[test]
#[ignore = "a helper: tests start it as a non-root peer with ED_ROGUE set"]
fn rogue_ads_peer() {
    let Ok(spec) = std::env::var("ED_ROGUE") else {
        return;
    };
    let (addr, how) = spec.split_once(' ').unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(rogue(addr.to_string(), how == "Nack"));
}

async fn rogue(addr: String, nack: bool) {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::google::rpc::Status;
    use prost::Message;
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let node = Some(Node {
        id: "envoy-docker".into(),
        ..Default::default()
    });
    for type_url in [CDS, LDS] {
        let req = DiscoveryRequest {
            node: node.clone(),
            type_url: type_url.into(),
            ..Default::default()
        };
        tx.send(req).await.unwrap();
    }
    let mut inbound = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // SotW: every EDS request names the clusters it wants, ACKs included.
    let mut eds_names: Vec<String> = Vec::new();
    while let Ok(Some(resp)) = inbound.message().await {
        if !nack {
            continue;
        }
        let mut req = DiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            version_info: resp.version_info.clone(),
            ..Default::default()
        };
        match resp.type_url.as_str() {
            CDS => {
                // Ask for every cluster's endpoints, as Envoy does.
                let names: Vec<String> = resp
                    .resources
                    .iter()
                    .filter_map(|a| {
                        envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(&a.value[..])
                            .ok()
                            .map(|c| c.name)
                    })
                    .collect();
                eds_names = names;
                tx.send(DiscoveryRequest {
                    type_url: EDS.into(),
                    resource_names: eds_names.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            EDS => req.resource_names = eds_names.clone(),
            LDS => {
                let names: Vec<String> = resp
                    .resources
                    .iter()
                    .filter_map(|a| Listener::decode(&a.value[..]).ok().map(|l| l.name))
                    .collect();
                req.version_info = String::new();
                req.error_detail = Some(Status {
                    code: 13,
                    message: format!(
                        "Error adding/updating listener(s) {}: cannot bind '0.0.0.0:1': Address already in use",
                        names.join(", ")
                    ),
                    ..Default::default()
                });
            }
            _ => {}
        }
        if tx.send(req).await.is_err() {
            return;
        }
    }
}

/// Runs a Python script as uid 65534; returns the child.
pub fn python_as_nobody(script: &str, args: &[&str]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Opens `n` TCP connections to `addr`, sends nothing, and holds them for
/// `secs` seconds.
pub fn idle_flood(addr: SocketAddr, n: usize, secs: u32) -> Child {
    let script = r#"
import socket, sys, time
host, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    held.append(s)
print(len(held), flush=True)
time.sleep(secs)
"#;
    python_as_nobody(
        script,
        &[
            &addr.ip().to_string(),
            &addr.port().to_string(),
            &n.to_string(),
            &secs.to_string(),
        ],
    )
}

/// CPU time (user plus system) that process `pid` has used, from /proc.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as u64;
    std::time::Duration::from_millis(ticks * 1000 / hz)
}

/// Asserts that `pid` uses under half a second of CPU over the next 3 s:
/// nothing in it spins.
pub fn assert_not_spinning(pid: u32) {
    let before = cpu_time(pid);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let used = cpu_time(pid) - before;
    assert!(
        used < std::time::Duration::from_millis(500),
        "pid {pid} used {used:?} of CPU in 3 s"
    );
}
