#!/usr/bin/env python3
"""What compression saves and costs: bytes on the wire and proxy CPU per response, per encoding and
level, for Django admin assets (base.css, the jQuery bundle, inlines.js) served from [[static]] and a
9 KiB JSON list, through portcullis (release build). Run through benches/compression.sh, which installs
wrk and Django (for the admin's static files) and builds the binary. Prints a Markdown table.

Method: as benches/load.py (proxy on core 0 with one worker, wrk on core 1, 16 connections over
HTTP/1.1 and TLS); CPU per response is the proxy's utime+stime over the run divided by the responses."""

import argparse
import glob
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LOAD_CORE, ROOT, Contender, cpu_seconds, make_cert, portcullis_toml, run  # noqa: E402


class Portcullis(Contender):
    def __init__(self, name, port, tmp, compression):
        super().__init__(name, port, tmp)
        self.compression = compression

    def command(self, cert, key, pem):
        conf = self.tmp / f"{self.name}.toml"
        extra = (f'[[static]]\nurl = "/static/"\ndir = "{self.tmp}/static"\ncache_control = "no-cache"\n'
                 f'[compression]\n{self.compression}\n')
        conf.write_text(portcullis_toml(self.port, self.tmp, cert, key, 'url = "http://127.0.0.1:9"', extra))
        return [str(ROOT / "target/release/portcullis"), "run", "--config", str(conf)], {}


def assets(tmp: Path):
    admin = glob.glob(str(ROOT / "target/test-venv/lib/python3*/site-packages/django/contrib/admin/static/admin"))
    if not admin:
        raise SystemExit("Django's admin static files are missing: run benches/compression.sh")
    static = tmp / "static"
    static.mkdir()
    files = {"base.css": "css/base.css", "jquery.min.js": "js/vendor/jquery/jquery.min.js",
             "inlines.js": "js/inlines.js"}
    for name, rel in files.items():
        (static / name).write_bytes((Path(admin[0]) / rel).read_bytes())
    items = [{"id": i, "name": f"item {i}", "price": f"{i}.00", "in_stock": True} for i in range(100)]
    (static / "items.json").write_text(json.dumps({"count": 100, "results": items}))
    return ["base.css", "jquery.min.js", "inlines.js", "items.json"]


def size_on_wire(port, path, encoding):
    out = run(["curl", "-sk", "--http1.1", "-H", f"Accept-Encoding: {encoding}", "-o", "/dev/null",
               "-w", "%{size_download} %{content_type}", f"https://localhost:{port}{path}"]).stdout
    return int(out.split()[0])


def load(contender, path, encoding, seconds):
    pid = contender.proc.pid
    before = cpu_seconds(pid)
    out = run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c16", f"-d{seconds}s", "-H",
               f"Accept-Encoding: {encoding}", f"https://localhost:{contender.port}{path}"]).stdout
    used = cpu_seconds(pid) - before
    import re
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"cpu_us": used / max(total, 1) * 1e6, "rps": rps}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-bench-gz-"))
    cert, key = make_cert(tmp, "ecdsa")
    files = assets(tmp)
    variants = [("identity", "enabled = false", "identity")]
    for level in (1, 4, 9):
        for encoding in ("zstd", "br", "gzip"):
            variants.append((f"{encoding} {level}", f'encodings = ["{encoding}"]\nlevel = {level}', encoding))
    results = {}
    port = 19461
    for rnd in range(args.rounds):
        for name, compression, encoding in (variants if rnd % 2 == 0 else list(reversed(variants))):
            contender = Portcullis(name.replace(" ", "-"), port, tmp, compression)
            contender.start(cert, key, tmp / "ecdsa.pem")
            try:
                for f in files:
                    path = f"/static/{f}"
                    size = size_on_wire(port, path, encoding)
                    r = load(contender, path, encoding, args.seconds)
                    results.setdefault((name, f), []).append({**r, "bytes": size})
                    print(f"round {rnd + 1} {name} {f}: {size} B, {r}", file=sys.stderr)
            finally:
                contender.stop()
    print(f"Medians of {args.rounds} rounds; wrk 16 connections, {args.seconds} s per cell, HTTP/1.1 over TLS, one worker.\n")
    print("| encoding, level | " + " | ".join(files) + " |")
    print("|---|" + "---:|" * len(files))
    for name, _, _ in variants:
        cells = []
        for f in files:
            rows = results[(name, f)]
            size = statistics.median(r["bytes"] for r in rows)
            cpu = statistics.median(r["cpu_us"] for r in rows)
            base = statistics.median(r["bytes"] for r in results[("identity", f)])
            cells.append(f"{size:,.0f} B ({size / base:.0%}), {cpu:.0f} µs")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
