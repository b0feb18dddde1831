#!/usr/bin/env python3
"""Many idle keep-alive TLS connections: what each costs in RSS, and what an honest client meanwhile sees.

For each contender (portcullis, nginx, HAProxy, set up as in benches/load.py, idle timeouts raised to 10
minutes for all) and each protocol (HTTP/1.1, HTTP/2): open N TLS connections from one asyncio client, make
one request on each (so every connection has been through a whole request, as a browser's has), leave them
idle, then measure the server's RSS (its whole process tree, VmRSS) against before, and run `wrk -c4`
(HTTP/1.1, new keep-alive connections) for the latency of an honest client while the N stay open. Run
through benches/idle.sh, which installs the tools and builds the binaries.
"""

import argparse
import asyncio
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (the contenders and helpers of the side-by-side run)

IDLE = "600s"
OPEN_AT_ONCE = 64
CONNECTIONS = 10_000  # set from --connections  # handshakes in flight while connecting, so the client does not time itself out


def open_sockets(pid):
    """Sockets the server's processes hold: the connections it still has open, and its listeners."""
    count = 0
    for p in load.process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    count += os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:")
                except OSError:
                    pass
        except OSError:
            pass
    return count


def current_rss_kib(pid):
    return load.status_kib(pid, "VmRSS:")


class IdlePortcullis(load.Portcullis):
    def command(self, cert, key, pem):
        conf = self.tmp / f"{self.name}.toml"
        extra = f'[limits]\nmax_connections = 30000\nidle_timeout = "{IDLE}"\n'
        conf.write_text(load.portcullis_toml(self.port, self.tmp, cert, key, self.upstream, extra, self.workers))
        # PORTCULLIS_BENCH_WRAP="heaptrack -o FILE" runs it under a heap profiler, PORTCULLIS_BENCH_BINARY
        # another build (one with full debug info, for heaptrack's backtraces).
        wrap = os.environ.get("PORTCULLIS_BENCH_WRAP", "").split()
        binary = os.environ.get("PORTCULLIS_BENCH_BINARY", str(load.ROOT / "target/release/portcullis"))
        return [*wrap, binary, "run", "--config", str(conf)], {}


class IdleNginx(load.Nginx):
    def command(self, cert, key, pem):
        cmd, env = super().command(cert, key, pem)
        conf = self.tmp / "nginx" / "nginx.conf"
        text = conf.read_text().replace("access_log off;", f"access_log off;\n  keepalive_timeout {IDLE};\n"
                                        f"  http2_idle_timeout {IDLE};")
        text = text.replace("worker_connections 20000;", "worker_connections 30000;")
        conf.write_text(text.replace("user root;", "user root;\nworker_rlimit_nofile 40000;"))
        return cmd, env


class IdleHAProxy(load.HAProxy):
    def command(self, cert, key, pem):
        cmd, env = super().command(cert, key, pem)
        conf = self.tmp / "haproxy.cfg"
        text = conf.read_text().replace("maxconn 8000", f"maxconn {CONNECTIONS + 100}")
        text = text.replace("timeout client 30s", f"timeout client {IDLE}\n  timeout http-keep-alive {IDLE}")
        conf.write_text(text)
        return cmd, env


def h2_request_frames():
    """The HTTP/2 preface, an empty SETTINGS, and GET / as one HEADERS frame (HPACK: static indexes for
    :method GET, :scheme https, :path /, and :authority as a literal without indexing)."""
    authority = b"localhost"
    block = bytes([0x82, 0x87, 0x84, 0x01, len(authority)]) + authority
    settings = (0).to_bytes(3, "big") + bytes([0x4, 0x0]) + (0).to_bytes(4, "big")
    headers = len(block).to_bytes(3, "big") + bytes([0x1, 0x5]) + (1).to_bytes(4, "big") + block
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + headers


async def read_h2_response(reader, writer):
    """Frames until stream 1 ends; SETTINGS acknowledged, as a client must."""
    while True:
        head = await reader.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        await reader.readexactly(length)
        if kind == 0x4 and not flags & 0x1:
            writer.write(bytes([0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]))
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return


async def open_idle(port, protocol, count):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"] if protocol == "h2" else ["http/1.1"])
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    held, failures = [], []

    async def one():
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"), 30)
                if protocol == "h2":
                    writer.write(h2_request_frames())
                    await asyncio.wait_for(read_h2_response(reader, writer), 30)
                else:
                    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                    length = next((int(l.split(b":")[1]) for l in head.lower().split(b"\r\n")
                                   if l.startswith(b"content-length:")), 0)
                    await asyncio.wait_for(reader.readexactly(length), 30)
                held.append(writer)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                failures.append(repr(e))

    await asyncio.gather(*(one() for _ in range(count)))
    return held, failures


async def measure(contender, protocol, count):
    pid = contender.proc.pid
    await asyncio.sleep(0.5)
    before = current_rss_kib(pid)
    started = time.monotonic()
    held, failures = await open_idle(contender.port, protocol, count)
    opened_in = time.monotonic() - started
    await asyncio.sleep(2)  # let the last answers' buffers settle
    after = current_rss_kib(pid)
    sockets = open_sockets(pid)
    honest = await asyncio.to_thread(load.wrk, contender.port, 5, 4)
    still = current_rss_kib(pid)
    for writer in held:
        writer.close()
    return {
        "open": len(held),
        "server_sockets": sockets,
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "opened_in_s": opened_in,
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "kib_per_connection": (after - before) / max(len(held), 1),
        "rss_after_wrk_mib": still / 1024,
        "honest_p50_ms": honest["p50_ms"],
        "honest_p99_ms": honest["p99_ms"],
        "honest_errors": honest["errors"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", help="comma-separated contenders (portcullis, nginx, haproxy)")
    parser.add_argument("--protocols", default="h1,h2", help="comma-separated: h1, h2")
    args = parser.parse_args()
    global CONNECTIONS
    CONNECTIONS = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # root may raise the hard limit: HAProxy wants two descriptors per connection it accepts
        hard = max(hard, 4 * args.connections + 1000)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 100:
        sys.exit(f"the open-file limit ({hard}) is too low for {args.connections} connections")
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-idle-"))
    cert, key = load.make_cert(tmp, "ecdsa")
    load.write_static_root(tmp)
    upstream = subprocess.Popen(["taskset", "-c", load.LOAD_CORE,
                                 str(load.ROOT / "target/release/examples/bench_upstream"), str(load.UPSTREAM_PORT)])
    load.wait_port(load.UPSTREAM_PORT)
    contenders = [IdlePortcullis(19543, tmp), IdleNginx("nginx", 19544, tmp), IdleHAProxy("haproxy", 19545, tmp)]
    if args.only:
        contenders = [c for c in contenders if c.name in set(args.only.split(","))]
    results = {}
    try:
        for rnd in range(args.rounds):
            for protocol in args.protocols.split(","):
                for c in contenders if rnd % 2 == 0 else list(reversed(contenders)):
                    c.start(cert, key, tmp / "ecdsa.pem")
                    try:
                        r = asyncio.run(measure(c, protocol, args.connections))
                    finally:
                        c.stop()
                    results.setdefault((protocol, c.name), []).append(r)
                    print(f"round {rnd + 1} {protocol} {c.name:12} open {r['open']} (server sockets {r['server_sockets']}) failed {r['failed']} "
                          f"({r['opened_in_s']:.1f}s) rss {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB "
                          f"= {r['kib_per_connection']:.1f} KiB/conn; honest p50 {r['honest_p50_ms']:.2f} ms "
                          f"p99 {r['honest_p99_ms']:.2f} ms errors {r['honest_errors']}"
                          + (f"; first failure {r['first_failure']}" if r["first_failure"] else ""), file=sys.stderr)
    finally:
        for c in contenders:
            c.stop()
        upstream.terminate()
        upstream.wait()

    med = lambda rs, k: statistics.median(r[k] for r in rs)
    print(f"Medians of {args.rounds} round(s); {args.connections} idle TLS connections each, one request made on "
          "each first; honest client: wrk -t1 -c4 -d5s meanwhile.\n")
    print("| protocol | server | open | RSS per connection | honest p50 | honest p99 | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (protocol, name), rs in results.items():
        print(f"| {protocol} | {name} | {med(rs, 'open'):.0f} | {med(rs, 'kib_per_connection'):.1f} KiB | "
              f"{med(rs, 'honest_p50_ms'):.2f} ms | {med(rs, 'honest_p99_ms'):.2f} ms | "
              f"{sum(r['honest_errors'] + r['failed'] for r in rs)} |")


if __name__ == "__main__":
    main()
