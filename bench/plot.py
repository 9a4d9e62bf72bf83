#!/usr/bin/env python3
"""Draws bench/ranges.py's JSON as PNG curves for docs/benchmarks.md.

  ranges-memory.png  the sum of PSS over every process involved, against the
                     number of published ports (docker-proxy: its proxies;
                     envoy-docker: proxies, registrar and Envoy, with the
                     proxies alone as a dashed line)
  ranges-served.png  time from the start of `docker run` until every
                     published address is served, against the number of
                     ports (with `docker run` returning as dashed lines)

Needs matplotlib (Debian: apt-get install python3-matplotlib).
Usage: bench/plot.py [JSON (target/bench/ranges.json)] [--out DIR (docs/img)]
"""
import argparse, json, os, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"docker-proxy": "docker-proxy (Docker 28)", "envoy-docker": "envoy-docker"}
COLORS = {"docker-proxy": "tab:red", "envoy-docker": "tab:blue"}


def series(results, proxy, value):
    """(ports, values) of one proxy, sorted by ports; rows without a value
    (say, never served) are left out."""
    pts = sorted((r["ports"], value(r)) for r in results if r["proxy"] == proxy)
    pts = [(n, v) for n, v in pts if v is not None]
    return [n for n, _ in pts], [v for _, v in pts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default=os.path.join(ROOT, "target/bench/ranges.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/img"))
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench/plot.py needs matplotlib, which is not installed: "
                         "apt-get install python3-matplotlib (or pip install matplotlib)")
    with open(a.json) as f:
        doc = json.load(f)
    results = doc.get("results", [])
    if not results:
        raise SystemExit(f"{a.json} holds no results" + (f" ({doc['error']})" if doc.get("error") else ""))
    os.makedirs(a.out, exist_ok=True)
    note = (f"Docker {doc.get('engine')}, firewall {doc.get('firewall')}, "
            f"{doc.get('cpus')} CPUs; each port is published on 0.0.0.0 and [::]")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for proxy in ("docker-proxy", "envoy-docker"):
        n, v = series(results, proxy, lambda r: r["pss_kb"]["total"] / 1024)
        if n:
            ax.plot(n, v, "o-", color=COLORS[proxy], label=LABELS[proxy] + ", every process involved")
    n, v = series(results, "envoy-docker", lambda r: r["pss_kb"]["proxies"] / 1024)
    if n:
        ax.plot(n, v, "o--", color=COLORS["envoy-docker"], alpha=0.6, label="envoy-docker, its proxies alone")
    ax.set_xlabel("published ports (-p A-B:A-B)")
    ax.set_ylabel("sum of PSS (MB)")
    ax.set_title("Memory against published ports")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    mem = os.path.join(a.out, "ranges-memory.png")
    fig.savefig(mem, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for proxy in ("docker-proxy", "envoy-docker"):
        n, v = series(results, proxy, lambda r: r.get("served_s"))
        if n:
            ax.plot(n, v, "o-", color=COLORS[proxy], label=LABELS[proxy] + ": all served")
        n, v = series(results, proxy, lambda r: r.get("run_s"))
        if n:
            ax.plot(n, v, "x--", color=COLORS[proxy], alpha=0.6, label=LABELS[proxy] + ": docker run returned")
    ax.set_xlabel("published ports (-p A-B:A-B)")
    ax.set_ylabel("seconds from the start of docker run")
    ax.set_title("Time until every published port is served")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    served = os.path.join(a.out, "ranges-served.png")
    fig.savefig(served, dpi=120)
    plt.close(fig)
    print(mem)
    print(served)


if __name__ == "__main__":
    sys.exit(main())
