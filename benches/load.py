#!/usr/bin/env python3
"""Side-by-side load benchmark on loopback: portcullis, nginx, HAProxy and Caddy as TLS-terminating
proxies in front of the same cheap upstream (examples/bench_upstream.rs), each adding the same security
headers and cookie flags (checked before timing). Run through benches/load.sh, which installs the tools
and builds the binaries. Writes a Markdown report to stdout and JSON next to it.

Method (see BENCHMARKS.md): proxy pinned to core 0 with one worker, load generator and upstream on core 1;
rounds interleave the contenders; per contender the median over rounds, and the ratio to nginx paired per
round (this machine is noisy: ratios, not absolutes)."""

import argparse
import gzip
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_PORT = 18080
GUNICORN_PORT = 18081
PROXY_CORE = "0"
LOAD_CORE = "1"

HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "content-security-policy": "default-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "permissions-policy": "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()",
    "cross-origin-opener-policy": "same-origin",
}
COOKIE_FLAGS = ("secure", "httponly", "samesite=lax")
# The static-file mode: a 4 KiB stylesheet each contender serves from disk at /static/ (HAProxy serves no
# files, so it sits that mode out).
STATIC_FILE = "/static/app.css"
# The compression mode: a 6.5 KiB JSON list from the upstream, gzip-compressed by the proxy (the one
# encoding every contender has) at level 1 for all (nginx's and HAProxy's default), HTTP/1.1 keep-alive.
JSON_PATH = "/api/items.json"
GZIP_LEVEL = 1


def write_static_root(tmp: Path) -> Path:
    root = tmp / "static"
    root.mkdir(exist_ok=True)
    rule = ".c{n} {{ color: #{n:06x}; margin: {n}px; padding: 0 {n}px; }}\n"
    text = "".join(rule.format(n=n) for n in range(200))[:4096]
    (root / "app.css").write_text(text)
    return root


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def make_cert(tmp: Path, kind: str):
    key, cert = tmp / f"{kind}.key", tmp / f"{kind}.crt"
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if kind == "ecdsa" else ["-newkey", "rsa:2048"]
    run(["openssl", "req", "-x509", "-nodes", *newkey, "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
    (tmp / f"{kind}.pem").write_text(cert.read_text() + key.read_text())
    return cert, key


def process_tree(pid):
    pids, frontier = [pid], [pid]
    while frontier:
        children = []
        for p in frontier:
            try:
                children += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                pass
        pids += children
        frontier = children
    return pids


def cpu_seconds(pid):
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def status_kib(pid, field):
    """A memory field of /proc/PID/status (VmHWM: peak RSS, VmRSS: now), summed over the process tree."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def peak_rss_kib(pid):
    return status_kib(pid, "VmHWM:")


def wait_port(port, timeout=15):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Contender:
    serves_files = True

    def __init__(self, name, port, tmp):
        self.name, self.port, self.tmp, self.proc = name, port, tmp, None

    def start(self, cert, key, pem, timeout=15):
        cmd, env = self.command(cert, key, pem)
        log = open(self.tmp / f"{self.name}.log", "w")
        self.proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, *cmd], stdout=log, stderr=log,
                                     env={**os.environ, **env}, start_new_session=True)
        wait_port(self.port, timeout)
        time.sleep(0.3)

    def stop(self):
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None


def portcullis_toml(port, tmp, cert, key, upstream, extra="", workers=1):
    """The config every benchmark runs portcullis with: one listener, the test certificate, no access log;
    `upstream` is the `[upstream]` body, `extra` more sections."""
    return f"""
[server]
https = "127.0.0.1:{port}"
domains = ["localhost", "127.0.0.1"]
workers = {workers}
[tls]
source = "files"
cert = "{cert}"
key = "{key}"
dir = "{tmp}/state"
[upstream]
{upstream}
[log]
access = false
level = "warn"
{extra}
"""


class Portcullis(Contender):
    def __init__(self, port, tmp, workers=1, backends=1):
        name = "portcullis" if workers == 1 else f"portcullis-{workers}w"
        super().__init__(name if backends == 1 else f"{name}-{backends}b", port, tmp)
        self.workers = workers
        # Two backends are the same upstream under two names (127.0.0.1 and localhost): the proxy
        # balances between two pools, which is what the cost of choosing is measured on.
        self.upstream = (f'url = "http://127.0.0.1:{UPSTREAM_PORT}"' if backends == 1 else
                         f'urls = ["http://127.0.0.1:{UPSTREAM_PORT}", "http://localhost:{UPSTREAM_PORT}"]')

    def command(self, cert, key, pem):
        conf = self.tmp / f"{self.name}.toml"
        extra = (f'[[static]]\nurl = "/static/"\ndir = "{self.tmp}/static"\n[limits]\nmax_connections = 20000\n'
                 f'[compression]\nlevel = {GZIP_LEVEL}\n')
        conf.write_text(portcullis_toml(self.port, self.tmp, cert, key, self.upstream, extra, self.workers))
        return [str(ROOT / "target/release/portcullis"), "run", "--config", str(conf)], {}


class Nginx(Contender):
    def command(self, cert, key, pem):
        prefix = self.tmp / "nginx"
        prefix.mkdir(exist_ok=True)
        adds = "\n".join(f'      add_header {k} "{v}" always;' for k, v in HEADERS.items())
        (prefix / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  server_tokens off;
  keepalive_requests 1000000;
  gzip on; gzip_types application/json; gzip_comp_level {GZIP_LEVEL}; gzip_min_length 1024;
  gzip_proxied any; gzip_vary on;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream app {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.port} ssl http2;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;
    ssl_session_cache shared:SSL:10m;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_hide_header X-Powered-By;
      proxy_cookie_flags ~ secure httponly samesite=lax;
{adds}
    }}
    location /static/ {{
      alias {self.tmp}/static/;
{adds}
    }}
  }}
}}
""")
        return ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"], {}


class HAProxy(Contender):
    serves_files = False

    def command(self, cert, key, pem):
        sets = "\n".join(f'  http-response set-header {k} "{v}"' for k, v in HEADERS.items())
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(f"""
global
  nbthread 1
  maxconn 8000
  ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
  ssl-default-bind-options ssl-min-ver TLSv1.2
  tune.comp.maxlevel {GZIP_LEVEL}
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{self.port} ssl crt {pem} alpn h2,http/1.1
  option forwardfor
  http-request set-header X-Forwarded-Proto https
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response del-header Server
  http-response del-header X-Powered-By
{sets}
  http-response replace-header Set-Cookie (.*) "\\1; Secure; HttpOnly; SameSite=Lax"
  compression algo gzip
  compression type application/json
  default_backend be
backend be
  http-reuse always
  server app 127.0.0.1:{UPSTREAM_PORT}
""")
        return ["haproxy", "-f", str(conf), "-db"], {}


class Caddy(Contender):
    def command(self, cert, key, pem):
        hdrs = "\n".join(f'    {k} "{v}"' for k, v in HEADERS.items())
        conf = self.tmp / "Caddyfile"
        conf.write_text(f"""{{
  admin off
  auto_https off
  default_sni localhost
  servers {{
    protocols h1 h2
  }}
}}
https://localhost:{self.port} {{
  tls {cert} {key}
  encode {{
    gzip {GZIP_LEVEL}
    minimum_length 1024
  }}
  header {{
{hdrs}
    -Server
  }}
  handle_path /static/* {{
    root * {self.tmp}/static
    file_server
  }}
  handle {{
    reverse_proxy 127.0.0.1:{UPSTREAM_PORT} {{
      header_down Set-Cookie "^(.*)$" "$1; Secure; HttpOnly; SameSite=Lax"
      header_down -X-Powered-By
    }}
  }}
}}
""")
        return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"], {"GOMAXPROCS": "1", "HOME": str(self.tmp)}


def verify(contender):
    """The peer must add the same headers and cookie flags before its numbers mean anything."""
    out = run(["curl", "-sk", "--http2", "-D", "-", "-o", "/dev/null", f"https://localhost:{contender.port}/"]).stdout.lower()
    missing = [h for h in HEADERS if f"\n{h}:" not in out]
    cookie = next((l for l in out.splitlines() if l.startswith("set-cookie:")), "")
    missing += [f"cookie {f}" for f in COOKIE_FLAGS if f not in cookie.replace(" ", "")]
    leaks = [h for h in ("x-powered-by",) if f"\n{h}:" in out]
    server = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("server:")), None)
    check = {"missing": missing, "leaks": leaks, "server_header": server, "h2": out.startswith("http/2")}
    gz = run(["curl", "-sk", "-D", "-", "-o", str(contender.tmp / "json-check.gz"), "-H", "Accept-Encoding: gzip",
              f"https://localhost:{contender.port}{JSON_PATH}"]).stdout.lower()
    direct = run(["curl", "-s", f"http://127.0.0.1:{UPSTREAM_PORT}{JSON_PATH}"]).stdout
    try:
        same = gzip.decompress((contender.tmp / "json-check.gz").read_bytes()).decode() == direct
    except OSError:
        same = False
    check["gzip"] = "ok" if "\ncontent-encoding: gzip" in gz and same else \
        f"FAILED (content-encoding gzip: {'content-encoding: gzip' in gz}, body equal: {same})"
    if contender.serves_files:
        head = run(["curl", "-sk", "-D", "-", "-o", str(contender.tmp / "static-check.css"),
                    f"https://localhost:{contender.port}{STATIC_FILE}"]).stdout.lower()
        same = (contender.tmp / "static-check.css").read_text() == (contender.tmp / "static/app.css").read_text()
        static_missing = [h for h in HEADERS if f"\n{h}:" not in head]
        status = head.split()[1] if len(head.split()) > 1 else "?"
        check["static"] = "ok" if status == "200" and same and not static_missing \
            else f"FAILED (status/body/headers: {head.splitlines()[:1]}, {same}, {static_missing})"
    return check


def wrk(port, seconds, connections, close=False, path="/", headers=()):
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    for header in headers:
        cmd += ["-H", header]
    out = run(cmd + [f"https://localhost:{port}{path}" if port != UPSTREAM_PORT else f"http://127.0.0.1:{port}/"]).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {"rps": rps, "requests": total, "p50_ms": pct(50), "p99_ms": pct(99), "errors": errors + non2xx}


def full_handshakes(port, seconds):
    """A new TLS connection each time, never a resumed session, no request (`openssl s_time -new`): what
    a full handshake costs the server. s_time sends no SNI, so portcullis also serves 127.0.0.1 here.
    One connection at a time, so latency is the inverse of the rate."""
    cmd = ["taskset", "-c", LOAD_CORE, "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
           "-time", str(seconds)]
    out = run(cmd).stdout
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    count, secs = int(m.group(1)), float(m.group(2))
    mean_ms = secs / max(count, 1) * 1000
    return {"rps": count / secs, "requests": count, "p50_ms": mean_ms, "p99_ms": float("nan"), "errors": 0}


def h2load(port, seconds, tmp):
    log = tmp / "h2load.log"
    cmd = ["taskset", "-c", LOAD_CORE, "h2load", "-c16", "-m8", "-D", str(seconds), "--warm-up-time=1",
           f"--log-file={log}", f"https://localhost:{port}/"]
    out = run(cmd).stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))
    failed = int(re.search(r"(\d+) failed", out).group(1))
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.split("\t")[1] == "200")
    q = lambda p: times[min(len(times) - 1, int(len(times) * p))] / 1000 if times else float("nan")
    return {"rps": rps, "requests": succeeded, "p50_ms": q(0.50), "p99_ms": q(0.99), "errors": failed}


def measure(contender, mode, seconds, tmp):
    pid = contender.proc.pid
    before = cpu_seconds(pid)
    if mode == "h1":
        result = wrk(contender.port, seconds, 64)
    elif mode == "static-h1":
        result = wrk(contender.port, seconds, 64, path=STATIC_FILE)
    elif mode == "gzip-json":
        result = wrk(contender.port, seconds, 64, path=JSON_PATH, headers=["Accept-Encoding: gzip"])
    elif mode == "h2":
        result = h2load(contender.port, seconds, tmp)
    else:
        result = full_handshakes(contender.port, seconds)
    used = cpu_seconds(pid) - before
    result["cpu_us_per_req"] = used / max(result["requests"], 1) * 1e6
    result["peak_rss_mib"] = peak_rss_kib(pid) / 1024
    return result


def gunicorn_added_latency(tmp, seconds):
    """The real thing: Django under Gunicorn (tests/django_app, 2 sync workers), measured directly over
    plain HTTP and through portcullis over HTTPS at the same light load; the difference is what the
    proxy adds to a Django request."""
    venv = ROOT / "target/test-venv"
    if not (venv / "bin/gunicorn").exists():
        return None
    app = ROOT / "tests/django_app"
    gunicorn = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, str(venv / "bin/gunicorn"), "--no-control-socket", "--workers", "2",
         "--bind", f"127.0.0.1:{GUNICORN_PORT}", "djangoapp.wsgi:application"],
        cwd=app, env={**os.environ, "DJANGO_DB_PATH": str(tmp / "db.sqlite3")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proxy = Portcullis(19448, tmp)
    proxy.name = "portcullis-gunicorn"
    original = proxy.command

    def command(cert, key, pem):
        cmd, env = original(cert, key, pem)
        conf = Path(cmd[-1])
        conf.write_text(conf.read_text().replace(f"127.0.0.1:{UPSTREAM_PORT}", f"127.0.0.1:{GUNICORN_PORT}"))
        return cmd, env

    proxy.command = command
    try:
        wait_port(GUNICORN_PORT)
        cert, key = make_cert(tmp, "gunicorn")
        proxy.start(cert, key, None)
        results = {}
        for name, url in (("gunicorn direct (HTTP)", f"http://127.0.0.1:{GUNICORN_PORT}/whoami/"),
                          ("through portcullis (HTTPS, h1)", f"https://localhost:{proxy.port}/whoami/")):
            out = run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c4", f"-d{seconds}s", "--latency", url]).stdout
            pct = lambda p: re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
            to_ms = lambda m: float(m.group(1)) / 1000 if m.group(2) == "us" else float(m.group(1)) * (1000 if m.group(2) == "s" else 1)
            results[name] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                             "p50_ms": to_ms(pct(50)), "p99_ms": to_ms(pct(99))}
        return results
    finally:
        proxy.stop()
        os.killpg(gunicorn.pid, signal.SIGTERM)
        gunicorn.wait(10)


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--only", help="comma-separated contenders")
    parser.add_argument("--json", type=Path, default=ROOT / "target/bench-load.json")
    parser.add_argument("--django-only", action="store_true", help="only the Gunicorn added-latency run")
    args = parser.parse_args()
    if args.django_only:
        django = gunicorn_added_latency(Path(tempfile.mkdtemp(prefix="portcullis-bench-")), args.seconds)
        print(json.dumps(django, indent=1))
        return

    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    certs = {kind: make_cert(tmp, kind) for kind in ("ecdsa", "rsa")}
    write_static_root(tmp)
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CORE, str(ROOT / "target/release/examples/bench_upstream"), str(UPSTREAM_PORT)])
    wait_port(UPSTREAM_PORT)
    contenders = [Portcullis(19443, tmp), Nginx("nginx", 19444, tmp), HAProxy("haproxy", 19445, tmp),
                  Caddy("caddy", 19446, tmp), Portcullis(19447, tmp, workers=2),
                  Portcullis(19448, tmp, backends=2)]
    if args.only:
        keep = set(args.only.split(","))
        contenders = [c for c in contenders if c.name in keep or (c.name == "nginx")]
    modes = [("h1", "ecdsa"), ("h2", "ecdsa"), ("static-h1", "ecdsa"), ("gzip-json", "ecdsa"),
             ("handshake-ecdsa", "ecdsa"),
             ("handshake-rsa", "rsa")]
    results = {m: {c.name: [] for c in contenders} for m, _ in modes}
    checks = {}
    ceiling = []
    try:
        for c in contenders:
            cert, key = certs["ecdsa"]
            c.start(cert, key, tmp / "ecdsa.pem")
            checks[c.name] = verify(c)
            c.stop()
            print(f"check {c.name}: {checks[c.name]}", file=sys.stderr)
        for rnd in range(args.rounds):
            ceiling.append(wrk(UPSTREAM_PORT, args.seconds, 64))
            for mode, kind in modes:
                order = contenders if rnd % 2 == 0 else list(reversed(contenders))
                for c in order:
                    if mode.startswith("static") and not c.serves_files:
                        continue
                    cert, key = certs[kind]
                    c.start(cert, key, tmp / f"{kind}.pem")
                    try:
                        r = measure(c, mode, args.seconds, tmp)
                    except (subprocess.CalledProcessError, AttributeError, ValueError) as e:
                        print(f"round {rnd + 1} {mode} {c.name}: measurement failed: {e}", file=sys.stderr)
                        continue
                    finally:
                        c.stop()
                    results[mode][c.name].append(r)
                    print(f"round {rnd + 1} {mode:16} {c.name:14} {r['rps']:9.0f} req/s p50 {r['p50_ms']:.2f}ms "
                          f"p99 {r['p99_ms']:.2f}ms cpu {r['cpu_us_per_req']:.1f}us/req rss {r['peak_rss_mib']:.1f}MiB "
                          f"errors {r['errors']}", file=sys.stderr)
    finally:
        for c in contenders:
            c.stop()
        upstream.terminate()
        upstream.wait()

    django = gunicorn_added_latency(tmp, args.seconds)
    args.json.write_text(json.dumps({"checks": checks, "results": results, "ceiling": ceiling, "django": django}, indent=1))
    report(results, checks, ceiling, args)
    if django:
        print("\n### Django under Gunicorn: what the proxy adds (wrk -c4)\n")
        print("| path | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
        for name, r in django.items():
            print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    else:
        print("\n(Django comparison skipped: no target/test-venv; run scripts/test.sh once to create it.)")


def report(results, checks, ceiling, args):
    print(f"Rounds: {args.rounds} × {args.seconds}s per test; proxy on core {PROXY_CORE} (one worker unless "
          f"named), load generator and upstream on core {LOAD_CORE}.\n")
    print(f"Upstream direct (plain HTTP/1.1, the ceiling): {median([r['rps'] for r in ceiling]):.0f} req/s.\n")
    for mode in results:
        print(f"### {mode}\n")
        print("| proxy | req/s | × nginx | p50 ms | p99 ms | CPU µs/req | × nginx | peak RSS MiB | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = results[mode].get("nginx", [])
        for name, runs in results[mode].items():
            if not runs:
                continue
            ratio = lambda key: median([r[key] / b[key] for r, b in zip(runs, base) if b[key]])
            print(f"| {name} | {median([r['rps'] for r in runs]):.0f} | {ratio('rps'):.2f} | "
                  f"{median([r['p50_ms'] for r in runs]):.2f} | {median([r['p99_ms'] for r in runs]):.2f} | "
                  f"{median([r['cpu_us_per_req'] for r in runs]):.1f} | {ratio('cpu_us_per_req'):.2f} | "
                  f"{max(r['peak_rss_mib'] for r in runs):.1f} | {sum(r['errors'] for r in runs)} |")
        print()
    print("Output checks (same headers and cookie flags on every contender):\n")
    for name, check in checks.items():
        print(f"- {name}: missing {check['missing'] or 'none'}; Server header: {check['server_header'] or 'none'}; "
              f"HTTP/2: {check['h2']}; gzip JSON: {check['gzip']}; "
              f"static file: {check.get('static', 'not served (no file server)')}")


if __name__ == "__main__":
    main()
