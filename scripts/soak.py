#!/usr/bin/env python3
"""Bounded soak on loopback: portcullis (release build) in front of the bench upstream under a few minutes
of mixed load with connection churn (HTTP/1.1 keep-alive, HTTP/2, a new TLS connection per request, and
abandoned half-open connections), then checks that open file descriptors and memory return to baseline.
Usage: scripts/soak.py [--minutes 3]. Needs wrk, h2load (benches/load.sh installs them) and a release build:
cargo build --release --bin portcullis --example bench_upstream."""

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from load import ROOT, UPSTREAM_PORT, make_cert, wait_port  # noqa: E402

PORT = 19543


def fds(pid):
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(pid, label):
    s = {"label": label, "fds": fds(pid), "rss_mib": rss_kib(pid) / 1024}
    print(f"{label:28} open fds {s['fds']:5}  RSS {s['rss_mib']:7.1f} MiB", flush=True)
    return s


def half_open(n):
    """Connections that start TLS and stop mid-handshake; the proxy must cut them at its timeout."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", PORT))
        s.sendall(b"\x16\x03\x01\x00\x05\x01\x00")
        held.append(s)
    return held


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-soak-"))
    cert, key = make_cert(tmp, "ecdsa")
    conf = tmp / "soak.toml"
    conf.write_text(f"""
[server]
https = "127.0.0.1:{PORT}"
domains = ["localhost"]
workers = 2
[tls]
source = "files"
cert = "{cert}"
key = "{key}"
dir = "{tmp}/state"
[upstream]
url = "http://127.0.0.1:{UPSTREAM_PORT}"
pool_idle_timeout = "3s"
[limits]
handshake_timeout = "2s"
idle_timeout = "5s"
header_read_timeout = "5s"
[log]
access = false
level = "warn"
""")
    upstream = subprocess.Popen([str(ROOT / "target/release/examples/bench_upstream"), str(UPSTREAM_PORT)])
    proxy = subprocess.Popen([str(ROOT / "target/release/portcullis"), "run", "--config", str(conf)])
    samples = []
    try:
        wait_port(UPSTREAM_PORT)
        wait_port(PORT)
        url = f"https://localhost:{PORT}/"
        # Warm up with one round of the same mix: pools, allocator arenas and session caches reach their
        # working size, so the baseline is the idle state the soak must return to.
        mixed_round(url, proxy.pid, None)
        time.sleep(8)  # longer than every timeout and the upstream pool's idle timeout
        samples.append(sample(proxy.pid, "baseline (idle after warm-up)"))
        deadline = time.time() + args.minutes * 60
        rounds = 0
        while time.time() < deadline:
            samples.append(mixed_round(url, proxy.pid, f"under load, round {rounds + 1}"))
            rounds += 1
        time.sleep(8)
        samples.append(sample(proxy.pid, "after load (idle)"))
    finally:
        proxy.terminate()
        upstream.terminate()
        proxy.wait(30)
        upstream.wait(30)
    base, end = samples[0], samples[-1]
    peak = max(samples, key=lambda s: s["fds"])
    print(f"\nrounds: {rounds}; fds baseline {base['fds']} → peak {peak['fds']} → after {end['fds']}; "
          f"RSS baseline {base['rss_mib']:.1f} MiB → peak {max(s['rss_mib'] for s in samples):.1f} MiB → "
          f"after {end['rss_mib']:.1f} MiB")
    ok = end["fds"] <= base["fds"] + 2 and end["rss_mib"] <= base["rss_mib"] * 1.15 + 2
    print("PASS: descriptors and memory returned to baseline" if ok else "FAIL: something was not released")
    sys.exit(0 if ok else 1)


def mixed_round(url, pid, label):
    """Ten seconds of keep-alive HTTP/1.1, multiplexed HTTP/2, a new TLS connection per request, and 200
    connections abandoned mid-handshake."""
    loads = [
        subprocess.Popen(["wrk", "-t1", "-c64", "-d10s", url], stdout=subprocess.DEVNULL),
        subprocess.Popen(["h2load", "-c8", "-m16", "-D", "10", url], stdout=subprocess.DEVNULL),
        subprocess.Popen(["wrk", "-t1", "-c8", "-d10s", "-H", "Connection: close", url], stdout=subprocess.DEVNULL),
    ]
    held = half_open(200)
    time.sleep(5)
    taken = sample(pid, label) if label else None
    for p in loads:
        p.wait(60)
    for s in held:
        s.close()
    return taken


if __name__ == "__main__":
    main()
