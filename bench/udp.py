#!/usr/bin/env python3
"""UDP through each path, in one run: direct, docker-proxy and envoy-docker.

One UDP echo backend, a sockperf server on 127.0.0.2, reached three ways
from 127.0.0.1: straight, through Debian's docker-proxy, and through our
binary in its proxy role (it always relays UDP itself). Both proxies are
spawned as dockerd spawns them: argv[0] docker-proxy, docker-proxy's flags
with -proto udp, and the status pipe on fd 3, from which "0\\n" is read.
Ours gets ENVOY_DOCKER_SOCKET pointing nowhere, so it relays without a
registrar.

Measured per path, in rounds that take the paths in turn (medians over the
rounds are shown, so a noisy moment on the machine hits every path alike),
and all of it twice: as the scheduler places things, and with every
process (clients, backend, proxies) pinned to one CPU. Unpinned, a round
trip depends much on whether a wake-up lands on an idle CPU (on a VM, a
halted vCPU: tens of microseconds): even the direct path varies from run to
run. Pinned, nothing waits for a CPU to wake, so what is left is each
path's own work, and the numbers repeat:
  - ping-pong: `sockperf ping-pong -m 64 --full-rtt`, one datagram in flight;
    median and mean round trip. A proxy's overhead is its round trip less
    the direct one; the target is ours <= 0.5x docker-proxy's;
  - throughput: `sockperf throughput -m SIZE` floods the path for a few
    seconds; what counts is what reaches the backend (the sockperf server's
    own count, read when it is stopped), in datagrams per second, beside
    what the client sent.
Beside each proxy: its CPU time (user + system, all its threads) per
second of the test, and for floods the datagrams relayed per second of
that CPU time: what a proxy can carry per CPU, which depends less than
the received rate on how the scheduler shares the CPUs out among the
client, the proxy and the backend (pinned, a proxy that yields its CPU
when it runs dry leaves more of it to the client and backend).

On a small machine client, proxy and backend compete for the CPUs, so a
received rate is partly the scheduler's doing; a bigger machine would
relay more through every path.

Needs sockperf (/usr/bin/sockperf, Debian's package), docker-proxy
(/usr/sbin/docker-proxy from docker.io) and a release build; no root.
Usage: bench/udp.py [--binary PATH] [--docker-proxy PATH] [--seconds N]
                    [--rounds N] [--sizes 64,1472] [--cpus all,0]
                    [--also 'LABEL=PATH [VAR=VALUE...]']...
--also adds another proxy binary to the run (say, an older build, or ours
with ENVOY_DOCKER_UDP_SPIN_US=0), spawned the same way.
Traffic stays on loopback (127.0.0.1 and 127.0.0.2).
"""
import argparse, fcntl, os, re, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import wait  # noqa: E402

HOST_IP, BACKEND_IP = "127.0.0.1", "127.0.0.2"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def udp_port(ip):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def pinned(cpus):
    """A preexec_fn that puts the child on `cpus` (None: anywhere) and
    gives it back SIGINT, which a script started in the background has
    ignored (sockperf prints its counts on SIGINT)."""
    def place():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
    return place


def spawn_udp_proxy(path, port, backend_port, sock_path, cpus=None, env=None):
    """Starts a proxy as dockerd does for a UDP port; returns the process
    once it has written "0\\n" on fd 3."""
    r, w = os.pipe()
    high_w = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(w)
    args = ["docker-proxy", "-proto", "udp", "-host-ip", HOST_IP, "-host-port", str(port),
            "-container-ip", BACKEND_IP, "-container-port", str(backend_port)]
    place = pinned(cpus)

    def prepare():
        os.dup2(high_w, 3)
        place()
    p = subprocess.Popen(args, executable=path, preexec_fn=prepare, pass_fds=(3,),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path, **(env or {})))
    os.close(high_w)
    status = os.read(r, 64)
    os.close(r)
    if status != b"0\n":
        p.kill()
        p.wait()
        raise SystemExit(f"{path} on {port} reported {status!r}")
    return p


class Backend:
    """A sockperf server on 127.0.0.2, started afresh for each throughput
    test: it says how many datagrams it got only when it stops."""

    def __init__(self, sockperf, port, tmp, cpus):
        self.sockperf, self.port, self.tmp, self.cpus = sockperf, port, tmp, cpus
        self.proc = None

    def start(self):
        self.log = os.path.join(self.tmp, f"server-{time.monotonic_ns()}.log")
        self.proc = subprocess.Popen([self.sockperf, "server", "-i", BACKEND_IP, "-p", str(self.port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     preexec_fn=pinned(self.cpus))
        assert wait(lambda: "using" in open(self.log).read() or self.proc.poll() is not None, 10), "sockperf server"
        assert self.proc.poll() is None, open(self.log).read()

    def stop(self):
        """Stops the server; returns how many datagrams it handled."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        self.proc = None
        m = re.search(r"Total (\d+) messages received", ANSI.sub("", open(self.log).read()))
        return int(m.group(1)) if m else 0


def sockperf(binary, cpus, *args):
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, preexec_fn=pinned(cpus))
    return ANSI.sub("", out.stdout + out.stderr)


def ping_pong(binary, cpus, ip, port, seconds, proc):
    """(median, mean) round trip in microseconds, 64-byte datagrams, and
    the proxy's CPU s/s."""
    cpu, start = (cpu_seconds(proc.pid) if proc else 0.0), time.monotonic()
    out = sockperf(binary, cpus, "ping-pong", "-i", ip, "-p", str(port), "-m", "64", "-t", str(seconds), "--full-rtt")
    median = re.search(r"percentile 50\.000 =\s+([\d.]+)", out)
    mean = re.search(r"avg-rtt=([\d.]+)", out) or re.search(r"avg-latency=([\d.]+)", out)
    if not (median and mean):
        raise SystemExit(f"cannot read sockperf ping-pong:\n{out}")
    cpu = (cpu_seconds(proc.pid) - cpu) if proc else 0.0
    return float(median.group(1)), float(mean.group(1)), cpu / (time.monotonic() - start)


def cpu_seconds(pid):
    """User + system time of every thread of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(binary, cpus, backend, ip, port, size, seconds, proc):
    """(received/s at the backend, sent/s by the client, proxy CPU s/s)."""
    backend.start()
    cpu = cpu_seconds(proc.pid) if proc else 0.0
    out = sockperf(binary, cpus, "throughput", "-i", ip, "-p", str(port), "-m", str(size), "-t", str(seconds))
    cpu = (cpu_seconds(proc.pid) - cpu) if proc else 0.0
    time.sleep(0.2)  # what is still queued reaches the backend
    got = backend.stop()
    m = re.search(r"Total of (\d+) messages sent in ([\d.]+) sec", out)
    if not m:
        raise SystemExit(f"cannot read sockperf throughput:\n{out}")
    sent, took = int(m.group(1)), float(m.group(2))
    return got / took, sent / took, cpu / took


def run_mode(a, cpus, proxies, sizes, tmp):
    """Every test on every path, a.rounds times; returns {test: {path: [result]}}."""
    bport = udp_port(BACKEND_IP)
    backend = Backend(a.sockperf, bport, tmp, cpus)
    procs, ports = {}, {"direct": (BACKEND_IP, bport)}
    tests = ["ping-pong"] + [f"flood {s} B" for s in sizes]
    results = {t: {p: [] for p in ports.keys() | proxies.keys()} for t in tests}
    try:
        for label, (binary, env) in proxies.items():
            port = udp_port(HOST_IP)
            procs[label] = spawn_udp_proxy(binary, port, bport, os.path.join(tmp, "no-registrar.sock"), cpus, env)
            ports[label] = (HOST_IP, port)
        for r in range(a.rounds):
            backend.start()
            for p in ports:
                results["ping-pong"][p].append(ping_pong(a.sockperf, cpus, *ports[p], a.seconds, procs.get(p)))
            backend.stop()
            for s in sizes:
                for p in ports:
                    results[f"flood {s} B"][p].append(
                        throughput(a.sockperf, cpus, backend, *ports[p], s, a.seconds, procs.get(p)))
            print(f"{'pinned to CPU ' + ','.join(map(str, cpus)) if cpus else 'unpinned'}: "
                  f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    finally:
        if backend.proc:
            backend.stop()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait()
    return results


def report(title, results, paths):
    def med(p, t, i):
        return statistics.median(x[i] for x in results[t][p])

    print(title)
    rtt = {p: med(p, "ping-pong", 0) for p in paths}
    dp_over = rtt["docker-proxy"] - rtt["direct"]
    print(f"  {'ping-pong 64 B':18} {'RTT median us':>14} {'RTT mean us':>12} {'overhead us':>12} "
          f"{'vs docker-proxy':>16} {'proxy CPU':>10}  each round's median")
    for p in paths:
        over = rtt[p] - rtt["direct"]
        ratio = f"{over / dp_over:.2f}x" if p != "direct" and dp_over > 0 else ""
        cpu = f"{med(p, 'ping-pong', 2) * 100:.0f}%" if p != "direct" else ""
        rounds = " ".join(f"{x[0]:.0f}" for x in results["ping-pong"][p])
        print(f"  {p:18} {rtt[p]:14.1f} {med(p, 'ping-pong', 1):12.1f} "
              f"{(over if p != 'direct' else 0):12.1f} {ratio:>16} {cpu:>10}  {rounds}")
    for t in results:
        if t == "ping-pong":
            continue
        dp = med("docker-proxy", t, 0)
        print(f"  {t:18} {'received/s':>14} {'sent/s':>12} {'':>12} {'vs docker-proxy':>16} {'proxy CPU':>10}"
              f"  received per proxy CPU-second")
        for p in paths:
            ratio = f"{med(p, t, 0) / dp:.2f}x" if dp > 0 else ""
            cpu = f"{med(p, t, 2) * 100:.0f}%" if p != "direct" else ""
            per_cpu = statistics.median(x[0] / x[2] for x in results[t][p] if x[2] > 0) if p != "direct" else None
            print(f"  {p:18} {med(p, t, 0):14.0f} {med(p, t, 1):12.0f} {'':>12} {ratio:>16} {cpu:>10}"
                  + (f"  {per_cpu:.0f}" if per_cpu else ""))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    ap.add_argument("--sockperf", default="/usr/bin/sockperf")
    ap.add_argument("--seconds", type=int, default=3, help="per test and path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="64,1472", help="flood datagram sizes")
    ap.add_argument("--cpus", default="all,0", help="modes: all (unpinned), or a CPU number to pin everything to")
    ap.add_argument("--also", action="append", default=[], metavar="'LABEL=PATH [VAR=VALUE...]'")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    proxies = {"docker-proxy": (a.docker_proxy, {}), "envoy-docker": (a.binary, {})}
    for extra in a.also:
        words = extra.split()
        label, path = words[0].split("=", 1)
        proxies[label] = (path, dict(w.split("=", 1) for w in words[1:]))
    paths = ["direct", *proxies]
    tmp = tempfile.mkdtemp(prefix="ed-udp-")
    modes = [None if m == "all" else {int(m)} for m in a.cpus.split(",")]
    results = [(m, run_mode(a, m, proxies, sizes, tmp)) for m in modes]
    print(f"UDP on loopback, {os.cpu_count()} CPUs, {a.rounds} rounds of {a.seconds} s per test and path; "
          f"medians over rounds")
    print()
    for m, r in results:
        report("unpinned" if m is None else f"all pinned to CPU {','.join(map(str, m))}", r, paths)
    for m, r in results:
        rtt = {p: statistics.median(x[0] for x in r["ping-pong"][p]) for p in paths}
        dp_over = rtt["docker-proxy"] - rtt["direct"]
        ours = rtt["envoy-docker"] - rtt["direct"]
        line = [f"{'unpinned' if m is None else 'pinned'}: RTT overhead ratio "
                + (f"{ours / dp_over:.2f}" if dp_over > 0 else "n/a") + " (target <= 0.5)"]
        for t in r:
            if t != "ping-pong":
                dp = statistics.median(x[0] for x in r[t]["docker-proxy"])
                ed = statistics.median(x[0] for x in r[t]["envoy-docker"])
                line.append(f"{t} {ed / dp:.2f}x" if dp > 0 else f"{t} n/a")
        print("; ".join(line) + " (target >= 2x)")


if __name__ == "__main__":
    main()
