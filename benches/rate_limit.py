#!/usr/bin/env python3
"""What a shared login budget costs: the latency of a rate-limited `POST /admin/login/` through
portcullis with the budget in Redis (`[storage] backend = "redis"`, redis-server on loopback), against
the same POST with the budget in the proxy, and an unthrottled POST. Run through benches/rate_limit.sh,
which installs wrk and redis-server and builds the binaries. Prints a Markdown table (p50, p99 over
`--rounds`, each round interleaving the three).

Method: as benches/load.py (proxy on core 0, load and upstream on core 1); wrk with one connection, so
the numbers are one request's latency, not throughput under contention. The budget is large enough
(1 000 000 a second) never to refuse: every request runs the rate-limit path in full."""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LOAD_CORE, ROOT, UPSTREAM_PORT, Contender, make_cert, portcullis_toml, run, wait_port  # noqa: E402

REDIS_PORT = 18379
POST_SCRIPT = """
wrk.method = "POST"
wrk.body = "csrfmiddlewaretoken=x&username=admin&password=guess"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
"""


class Variant(Contender):
    def __init__(self, name, port, tmp, extra):
        super().__init__(name, port, tmp)
        self.extra = extra

    def command(self, cert, key, pem):
        conf = self.tmp / f"{self.name.replace(' ', '-')}.toml"
        upstream = f'url = "http://127.0.0.1:{UPSTREAM_PORT}"'
        conf.write_text(portcullis_toml(self.port, self.tmp, cert, key, upstream, self.extra))
        return [str(ROOT / "target/release/portcullis"), "run", "--config", str(conf)], {}


def post_latency(port, seconds, script):
    out = run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", "-s", str(script),
               f"https://localhost:{port}/admin/login/"]).stdout
    import re

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return {"p50_ms": pct(50), "p99_ms": pct(99), "non2xx": non2xx}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-bench-rl-"))
    cert, key = make_cert(tmp, "ecdsa")
    script = tmp / "post.lua"
    script.write_text(POST_SCRIPT)
    budget = '[[rate_limit]]\npath = "/admin/login/"\nrequests = 1000000\nper = "1s"\n'
    variants = [
        Variant("unthrottled", 19451, tmp, ""),
        Variant("local budget", 19452, tmp, budget),
        Variant("redis budget", 19453, tmp,
                budget + f'[storage]\nbackend = "redis"\nurl = "redis://127.0.0.1:{REDIS_PORT}/0"\n'),
    ]
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CORE, str(ROOT / "target/release/examples/bench_upstream"),
                                 str(UPSTREAM_PORT)])
    redis = subprocess.Popen(["taskset", "-c", LOAD_CORE, "redis-server", "--port", str(REDIS_PORT), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    results = {v.name: [] for v in variants}
    try:
        wait_port(UPSTREAM_PORT)
        wait_port(REDIS_PORT)
        for rnd in range(args.rounds):
            for v in (variants if rnd % 2 == 0 else list(reversed(variants))):
                v.start(cert, key, tmp / "ecdsa.pem")
                try:
                    r = post_latency(v.port, args.seconds, script)
                finally:
                    v.stop()
                if r["non2xx"]:
                    raise SystemExit(f"{v.name}: {r['non2xx']} refused or failed POSTs; the budget must not refuse")
                results[v.name].append(r)
                print(f"round {rnd + 1} {v.name}: {r}", file=sys.stderr)
        keys = run(["redis-cli", "-p", str(REDIS_PORT), "--scan", "--pattern", "portcullis:*"]).stdout.split()
    finally:
        for p in (upstream, redis):
            p.terminate()
            p.wait()
    base = results["unthrottled"]
    print(f"Medians of {args.rounds} rounds of {args.seconds} s, one connection (`wrk -c1`), HTTP/1.1 over TLS:\n")
    print("| POST /admin/login/ | p50 | p99 | p50 added | p99 added |")
    print("|---|---:|---:|---:|---:|")
    for name, rounds in results.items():
        p50 = statistics.median(r["p50_ms"] for r in rounds)
        p99 = statistics.median(r["p99_ms"] for r in rounds)
        b50 = statistics.median(r["p50_ms"] for r in base)
        b99 = statistics.median(r["p99_ms"] for r in base)
        print(f"| {name} | {p50:.3f} ms | {p99:.3f} ms | {p50 - b50:+.3f} ms | {p99 - b99:+.3f} ms |")
    print(f"\nKeys in Redis after the run: {len(keys)} (one bucket per client address and rule).")


if __name__ == "__main__":
    main()
