//! Docker 29's experimental nftables firewall (`--firewall-backend=
//! nftables`), simulated: no Docker 29 engine runs here, so the test writes
//! the rules Docker 29 writes for `-p H:80`, starts the proxy the way
//! Docker 29 does (the host socket bound by the daemon behind a drop-all
//! filter, passed as fd 4 with `-use-listen-fd`; `harness::proc`), and
//! checks that the claim still wins.
//!
//! The rules follow moby's source, `daemon/libnetwork/drivers/bridge/
//! internal/nftabler/` (v29.0 to v29.7):
//! - `nftabler.go`, `init`: tables `ip docker-bridges` and `ip6
//!   docker-bridges`; base chains `nat-PREROUTING` (hook prerouting) and
//!   `nat-OUTPUT` (hook output) at `BaseChainPriorityDstNAT` (-100), both
//!   jumping on `fib daddr type local` to `nat-prerouting-and-output`, the
//!   output one only for `ip daddr != 127.0.0.0/8` while the userland proxy
//!   is on (Debian 12's nft 1.0.6 does not take the name `dstnat` on the
//!   output hook, so the rules give its value, -100, as moby's generated
//!   documents show it); `nat-POSTROUTING` at srcnat, `filter-FORWARD` at filter and
//!   `raw-PREROUTING` at raw, with per-bridge chains behind verdict maps;
//! - `port.go`, `setPerPortDNAT`: in `nat-prerouting-and-output`,
//!   `iifname != <bridge> tcp dport <host port> counter dnat to
//!   <container>:<port> comment "DNAT"` (the `iifname` test only while the
//!   proxy is on); `setPerPortForwarding`: the accept in the bridge's
//!   `filter-forward-in` chain;
//! - `network.go`: the bridge's MASQUERADE, ICC, "UNPUBLISHED PORT DROP" and
//!   raw "DROP DIRECT ACCESS" rules, as in moby's generated document
//!   `integration/network/bridge/nftablesdoc/generated/usernet-portmap.md`.
//!
//! With this backend Docker does not turn on IP forwarding itself
//! (moby's docs, "Docker with nftables"): the simulation does, as a user
//! must.

use super::*;
use crate::harness::dockerd::Netns;
use crate::harness::ip;
use crate::harness::{in_netns, ProxySpec, Stack};
use std::process::{Child, Command, Stdio};

const HOST_NS: &str = "edd-29";
const CONTAINER_NS: &str = "edd-29c";
const CONTAINER: &str = "172.29.7.2";

/// Docker 29's `ip docker-bridges` table for one container on bridge
/// `edtest0` with `-p port:80`, the userland proxy on.
fn docker29_rules(port: u16) -> String {
    format!(
        r#"table ip docker-bridges {{
  chain filter-forward-in__edtest0 {{
    ct state established,related counter accept
    iifname "edtest0" counter accept comment "ICC"
    ip daddr {CONTAINER} tcp dport 80 counter accept
    counter drop comment "UNPUBLISHED PORT DROP"
  }}
  chain filter-forward-out__edtest0 {{
    ct state established,related counter accept
    counter accept comment "OUTGOING"
  }}
  chain nat-postrouting-in__edtest0 {{
  }}
  chain nat-postrouting-out__edtest0 {{
    oifname != "edtest0" ip saddr 172.29.7.0/24 counter masquerade comment "MASQUERADE"
  }}
  map filter-forward-in-jumps {{
    type ifname : verdict
    elements = {{ "edtest0" : jump filter-forward-in__edtest0 }}
  }}
  map filter-forward-out-jumps {{
    type ifname : verdict
    elements = {{ "edtest0" : jump filter-forward-out__edtest0 }}
  }}
  map nat-postrouting-in-jumps {{
    type ifname : verdict
    elements = {{ "edtest0" : jump nat-postrouting-in__edtest0 }}
  }}
  map nat-postrouting-out-jumps {{
    type ifname : verdict
    elements = {{ "edtest0" : jump nat-postrouting-out__edtest0 }}
  }}
  chain nat-prerouting-and-output {{
    iifname != "edtest0" tcp dport {port} counter dnat to {CONTAINER}:80 comment "DNAT"
  }}
  chain filter-FORWARD {{
    type filter hook forward priority filter; policy accept;
    oifname vmap @filter-forward-in-jumps
    iifname vmap @filter-forward-out-jumps
  }}
  chain nat-OUTPUT {{
    type nat hook output priority -100; policy accept;
    ip daddr != 127.0.0.0/8 fib daddr type local counter jump nat-prerouting-and-output
  }}
  chain nat-POSTROUTING {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname vmap @nat-postrouting-out-jumps
    oifname vmap @nat-postrouting-in-jumps
  }}
  chain nat-PREROUTING {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local counter jump nat-prerouting-and-output
  }}
  chain raw-PREROUTING {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {CONTAINER} iifname != "edtest0" counter drop comment "DROP DIRECT ACCESS"
  }}
}}
table ip6 docker-bridges {{
  chain nat-OUTPUT {{
    type nat hook output priority -100; policy accept;
  }}
  chain nat-PREROUTING {{
    type nat hook prerouting priority dstnat; policy accept;
  }}
}}
"#
    )
}

fn nsenter(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
    c
}

/// The namespaces, the container's server, and whatever runs in them,
/// gone on drop.
struct World {
    dir: crate::harness::TempDir,
    server: Option<Child>,
}

impl World {
    fn make() -> World {
        let dir = crate::harness::TempDir::new("docker29");
        Netns::new(HOST_NS, 3).make();
        let _ = Command::new("ip")
            .args(["netns", "delete", CONTAINER_NS])
            .output();
        ip(&["netns", "add", CONTAINER_NS]);
        ip(&[
            "-n",
            HOST_NS,
            "link",
            "add",
            "edd-29c",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            CONTAINER_NS,
        ]);
        ip(&[
            "-n", HOST_NS, "link", "set", "edd-29c", "master", "edtest0", "up",
        ]);
        for args in [
            vec!["addr", "add", "172.29.7.2/24", "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", GATEWAY],
        ] {
            let mut all = vec!["-n", CONTAINER_NS];
            all.extend(args);
            ip(&all);
        }
        let bin = dir.path("whoami");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/whoami.c");
        let out = Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&bin)
            .arg(src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = nsenter(CONTAINER_NS, bin.to_str().unwrap())
            .args(["tcp", "80"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let out = nsenter(HOST_NS, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        World {
            dir,
            server: Some(server),
        }
    }

    fn nft(&self, script: &str) {
        let path = self.dir.path("rules.nft");
        std::fs::write(&path, script).unwrap();
        let out = nsenter(HOST_NS, "nft")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [CONTAINER_NS, HOST_NS] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

#[test]
fn fw_7_docker_29s_nftables_backend_is_passed_by_the_claim() {
    let world = World::make();
    let host = Netns::new(HOST_NS, 3);
    let port = free_port();
    world.nft(&docker29_rules(port));
    let outside = SocketAddr::new(host.host_ip().into(), port);
    // Docker 29's rules alone: the outside client reaches the container
    // directly, seen with its own address.
    assert_eq!(who_sees(outside), host.outside_ip().to_string());

    let mut stack = Stack::start_in(
        HOST_NS,
        host.host_ip().into(),
        Ads::Sotw,
        &["--docker", "none", "--nft", "nft"],
    );
    let backend: SocketAddr = format!("{CONTAINER}:80").parse().unwrap();
    let proxy = in_netns(HOST_NS, || {
        stack
            .proxy(ProxySpec::tcp("0.0.0.0", port, backend).docker(29, false))
            .ready()
    });
    assert!(stack.wait_served_by(&[port], "envoy", Duration::from_secs(10)));
    let prefix = format!("172-29-7-2-80_tcp_0-0-0-0_{port}");
    // Claimed: the same client now comes through Envoy, which connects from
    // the gateway.
    assert_eq!(who_sees(outside), GATEWAY);
    assert!(stack.served(&prefix) > 0, "Envoy did not count it");
    // Docker's DNAT is still there, only passed: its counter stays put
    // while ours serve.
    let rules = String::from_utf8_lossy(
        &nsenter(HOST_NS, "nft")
            .args([
                "list",
                "chain",
                "ip",
                "docker-bridges",
                "nat-prerouting-and-output",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(rules.contains(&format!("tcp dport {port}")), "{rules}");
    drop(proxy);
    stack.kill_registrar();
    stack.stop_envoys();
}
