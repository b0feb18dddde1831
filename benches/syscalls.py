#!/usr/bin/env python3
"""System calls per request, counted by strace: portcullis against nginx and HAProxy with
benches/load.py's configs (same headers, cookie flags, upstream, certificate). The kernel's share of a
request's CPU follows what the server asks of it: each write to a TLS client is a record on the wire and
a wake-up on the other end. Run through benches/syscalls.sh. Prints a Markdown table with the calls that
make up each count.

Method: each server runs with `benches/load.py`'s config, is warmed up with 2,000 requests, then
`strace -c -f` is attached to every process of it for `--requests` requests (h2load on the load core);
the count per request is the total over the requests. strace slows the server, so only the counts mean
anything, not the time. Modes as in benches/instructions.py."""

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instructions import MODES, set_up  # noqa: E402
from load import LOAD_CORE, process_tree  # noqa: E402

# A line of `strace -c`: % time, seconds, usecs/call, calls, [errors], syscall.
STRACE_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)$")


def h2load(port, flags, path, requests):
    subprocess.run(["taskset", "-c", LOAD_CORE, "h2load", *flags, "-n", str(requests),
                    f"https://localhost:{port}{path}"], check=True, capture_output=True)


def count(contender, mode, requests, tmp):
    """System calls per request by name, over `requests` requests after a warm-up."""
    flags, path = MODES[mode]
    h2load(contender.port, flags, path, 2000)
    out = tmp / f"strace-{contender.name}-{mode}.txt"
    pids = [arg for pid in process_tree(contender.proc.pid) for arg in ("-p", str(pid))]
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *pids], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace attaches to every thread before the load starts
        h2load(contender.port, flags, path, requests)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
    calls = {}
    for line in out.read_text().splitlines():
        row = STRACE_ROW.match(line)
        if row and row.group(3) != "total":
            calls[row.group(3)] = int(row.group(1)) / requests
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--only", help="comma-separated contenders (portcullis, nginx, haproxy)")
    args = parser.parse_args()
    tmp, cert, key, upstream, contenders = set_up("portcullis-syscalls-", args.only)
    print(f"{args.requests:,} requests after 2,000 to warm up; system calls per request (strace -c -f)\n")
    print("| path | server | per request | the largest |")
    print("|---|---|---:|---|")
    try:
        for mode in MODES:
            for c in contenders:
                if mode.startswith("static") and not c.serves_files:
                    continue
                c.start(cert, key, tmp / "ecdsa.pem")
                try:
                    calls = count(c, mode, args.requests, tmp)
                finally:
                    c.stop()
                largest = sorted(calls.items(), key=lambda kv: -kv[1])[:4]
                print(f"| {mode} | {c.name} | {sum(calls.values()):.2f} | "
                      + ", ".join(f"{name} {n:.2f}" for name, n in largest) + " |", flush=True)
    finally:
        upstream.terminate()


if __name__ == "__main__":
    main()
