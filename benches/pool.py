#!/usr/bin/env python3
"""Does the upstream pool churn? HTTP/2 with 320 concurrent streams (h2load -c4 -m80) through portcullis to
the bench upstream, with `upstream.pool_max_idle` below and above the concurrency: requests per second,
proxy CPU per request, and how many upstream connections the proxy opened during the run (the bench
upstream counts its accepts). Then POSTs (h2load -d, a 1 KiB form body), which take a kept-alive
connection only if it was idle for under `pool_reuse_for_posts`: with it at 0 s (a new connection per
POST) and at its default. Run through benches/pool.sh. Prints a Markdown table (medians of rounds).

Method: as benches/load.py (proxy on core 0, one worker; load and upstream on core 1)."""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LOAD_CORE, ROOT, UPSTREAM_PORT, Contender, cpu_seconds, make_cert, portcullis_toml, run, wait_port  # noqa: E402


class Variant(Contender):
    def __init__(self, name, port, tmp, max_idle, post_reuse=None):
        super().__init__(name, port, tmp)
        self.max_idle, self.post_reuse = max_idle, post_reuse

    def command(self, cert, key, pem):
        conf = self.tmp / f"{self.name}.toml"
        idle = "" if self.max_idle is None else f"\npool_max_idle = {self.max_idle}"
        if self.post_reuse is not None:
            idle += f'\npool_reuse_for_posts = "{self.post_reuse}"'
        upstream = f'url = "http://127.0.0.1:{UPSTREAM_PORT}"{idle}'
        extra = ""
        conf.write_text(portcullis_toml(self.port, self.tmp, cert, key, upstream, extra))
        return [str(ROOT / "target/release/portcullis"), "run", "--config", str(conf)], {}


def upstream_connections():
    with urllib.request.urlopen(f"http://127.0.0.1:{UPSTREAM_PORT}/__connections", timeout=5) as r:
        return int(r.read())


def h2load(contender, seconds, post_body=None):
    pid = contender.proc.pid
    before_cpu, before_conns = cpu_seconds(pid), upstream_connections()
    post = ["-d", str(post_body), "-H", "content-type: application/x-www-form-urlencoded"] if post_body else []
    out = run(["taskset", "-c", LOAD_CORE, "h2load", "-c4", "-m80", "-D", str(seconds), "--warm-up-time=1",
               *post, f"https://localhost:{contender.port}/"]).stdout
    used, opened = cpu_seconds(pid) - before_cpu, upstream_connections() - before_conns
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))
    failed = int(re.search(r"(\d+) failed", out).group(1))
    return {"rps": rps, "cpu_us": used / max(succeeded, 1) * 1e6, "opened": opened, "failed": failed,
            "requests": succeeded}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-bench-pool-"))
    cert, key = make_cert(tmp, "ecdsa")
    body = tmp / "form.txt"
    body.write_text("a=" + "x" * 1022)
    variants = [Variant("pool_max_idle = 64", 19471, tmp, 64), Variant("pool_max_idle = 1024", 19472, tmp, 1024),
                Variant("default", 19473, tmp, None),
                Variant("POST, pool_reuse_for_posts = 0s", 19474, tmp, None, "0s"),
                Variant("POST, default (500ms)", 19475, tmp, None)]
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CORE, str(ROOT / "target/release/examples/bench_upstream"),
                                 str(UPSTREAM_PORT)])
    results = {v.name: [] for v in variants}
    try:
        wait_port(UPSTREAM_PORT)
        for rnd in range(args.rounds):
            for v in (variants if rnd % 2 == 0 else list(reversed(variants))):
                v.start(cert, key, tmp / "ecdsa.pem")
                try:
                    r = h2load(v, args.seconds, body if v.name.startswith("POST") else None)
                finally:
                    v.stop()
                results[v.name].append(r)
                print(f"round {rnd + 1} {v.name}: {r}", file=sys.stderr)
    finally:
        upstream.terminate()
        upstream.wait()
    print(f"Medians of {args.rounds} rounds of {args.seconds} s; h2load -c4 -m80 (320 streams), one worker:\n")
    print("| variant | req/s | CPU per request | upstream connections opened | per 1,000 requests | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        med = lambda k: statistics.median(r[k] for r in rounds)
        per_k = statistics.median(r["opened"] / max(r["requests"], 1) * 1000 for r in rounds)
        print(f"| {name} | {med('rps'):,.0f} | {med('cpu_us'):.1f} µs | {med('opened'):,.0f} | {per_k:.1f} | {med('failed'):.0f} |")


if __name__ == "__main__":
    main()
