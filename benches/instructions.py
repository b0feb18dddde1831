#!/usr/bin/env python3
"""User-space instructions per request, counted by valgrind's callgrind: portcullis against nginx and
HAProxy with benches/load.py's configs (same headers, cookie flags, upstream, certificate). Unlike CPU
time on this shared machine, the count hardly moves between runs, so a change of a few percent shows.
Run through benches/instructions.sh. Prints a Markdown table.

Method: each server runs alone under callgrind (nginx without its master process, HAProxy with one
thread), once for `--warm-up` requests and once for `--warm-up` plus `--requests`, each from start to
exit; the difference divided by `--requests` is the count per request (start, the first connections
and exit cancel out). Modes: HTTP/1.1
keep-alive (`h2load --h1 -c16`), HTTP/2 (`-c16 -m8`), the 4 KiB static file over HTTP/1.1 (HAProxy serves
no files). Kernel work (socket I/O, TLS records on the wire) is not counted: it is a syscall count,
which load.py's CPU times include."""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    LOAD_CORE, ROOT, STATIC_FILE, UPSTREAM_PORT, HAProxy, Nginx, Portcullis, make_cert, verify, wait_port,
    write_static_root)

MODES = {
    "h1": (["--h1", "-c16"], "/"),
    "h2": (["-c16", "-m8"], "/"),
    "static-h1": (["--h1", "-c16"], STATIC_FILE),
}


def under_callgrind(contender, out: Path):
    """The contender's command wrapped in valgrind (one process, so the counts are all of it)."""

    def command(cert, key, pem):
        cmd, env = type(contender).command(contender, cert, key, pem)
        if cmd[0] == "nginx":
            cmd = [*cmd[:-1], "daemon off; master_process off;"]
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd], env

    return command


def h2load(port, flags, path, requests):
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "h2load", *flags, "-n", str(requests),
                          f"https://localhost:{port}{path}"], check=True, capture_output=True, text=True).stdout
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    if succeeded != requests or ok != requests:
        raise RuntimeError(f"h2load: {succeeded} of {requests} succeeded, {ok} 2xx:\n{out}")


def instructions(dump: Path) -> int:
    """The `summary:` (or `totals:`) line of a callgrind dump: instructions executed."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def total_after(contender, mode, requests, tmp, cert, key):
    """Instructions from start to exit of one server process that answered `requests` requests."""
    flags, path = MODES[mode]
    out = tmp / f"cg-{contender.name}-{mode}-{requests}.out"
    contender.command = under_callgrind(contender, out)
    try:
        # Valgrind starts a server in seconds, more on a loaded machine.
        contender.start(cert, key, tmp / "ecdsa.pem", timeout=120)
        h2load(contender.port, flags, path, requests)
    finally:
        # SIGTERM: each server exits on its own and callgrind writes the dump as it does.
        if contender.proc:
            os.killpg(contender.proc.pid, signal.SIGTERM)
            contender.proc.wait(120)
            contender.proc = None
        del contender.command
    return instructions(out)


def count(contender, mode, args, tmp, cert, key):
    """Per request: the difference between a run of warm-up plus measured requests and a run of the
    warm-up alone, so start, first connections and exit cancel out."""
    short = total_after(contender, mode, args.warm_up, tmp, cert, key)
    full = total_after(contender, mode, args.warm_up + args.requests, tmp, cert, key)
    return (full - short) / args.requests


def set_up(prefix, only):
    """A temporary directory with the certificate and the static root, the bench upstream running on
    the load core, and the contenders `only` names (all three when `None`), with benches/load.py's
    configs. Shared with benches/syscalls.py."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    cert, key = make_cert(tmp, "ecdsa")
    write_static_root(tmp)
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CORE, str(ROOT / "target/release/examples/bench_upstream"),
                                 str(UPSTREAM_PORT)])
    wait_port(UPSTREAM_PORT)
    contenders = [Portcullis(19443, tmp), Nginx("nginx", 19444, tmp), HAProxy("haproxy", 19445, tmp)]
    if only:
        contenders = [c for c in contenders if c.name in only.split(",")]
    return tmp, cert, key, upstream, contenders


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--only", help="comma-separated contenders (portcullis, nginx, haproxy)")
    args = parser.parse_args()
    tmp, cert, key, upstream, contenders = set_up("portcullis-instructions-", args.only)
    results = {}
    try:
        for c in contenders:
            c.start(cert, key, tmp / "ecdsa.pem")
            check = verify(c)
            c.stop()
            print(f"check {c.name}: {check}", file=sys.stderr)
            for mode in MODES:
                if mode.startswith("static") and not c.serves_files:
                    continue
                results[(c.name, mode)] = count(c, mode, args, tmp, cert, key)
                print(f"{c.name} {mode}: {results[(c.name, mode)]:,.0f} instructions/request", file=sys.stderr)
    finally:
        upstream.terminate()
        upstream.wait()
    names = [c.name for c in contenders]
    print(f"{args.requests:,} requests after {args.warm_up} to warm up; user-space instructions per request "
          f"(callgrind)\n")
    print("| path | " + " | ".join(names) + (" | portcullis × nginx |" if "nginx" in names else " |"))
    print("|---|" + "---:|" * (len(names) + ("nginx" in names)))
    for mode in MODES:
        cells = [f"{results[(n, mode)]:,.0f}" if (n, mode) in results else "—" for n in names]
        ratio = ""
        if ("portcullis", mode) in results and ("nginx", mode) in results:
            ratio = f" {results[('portcullis', mode)] / results[('nginx', mode)]:.2f} |"
        print(f"| {mode} | " + " | ".join(cells) + " |" + ratio)


if __name__ == "__main__":
    main()
