"""Runs the TLS benchmark; see tls.sh. Writes the TLS section of bench/RESULTS.md.

Same fairness rules as the HTTP benchmark: each server has one worker pinned to CPU 0
(nginx worker_processes 1, HAProxy nbthread 1, meshgate TOKIO_WORKER_THREADS=1), the backend
and the load generator share CPU 1, logging is off, every server proxies to the same backend
with upstream keep-alive and serves the same certificate. Session resumption is off in all
three (nginx ssl_session_cache/tickets off, HAProxy no-tls-tickets and no cache, meshgate
tls.session_resumption = false), so every new connection is a full TLS 1.3 handshake.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import ROOT, cpu_seconds, haproxy_conf, ms, nginx_conf, replace_section, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
RATE = int(os.environ.get("RATE", "4000"))
HANDSHAKE_CONNS = 32
KEEPALIVE_CONNS = 64
BACKEND_PORT = 18000
PORTS = {"meshgate": 18443, "nginx": 18444, "haproxy": 18445}
HOST = "bench.local"
PROXY_CPU, LOAD_CPU = "0", "1"
KEYS = {"ECDSA P-256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"], "RSA-2048": ["-newkey", "rsa:2048"]}

tmp = tempfile.mkdtemp(prefix="meshgate-bench-tls-")


def write(name, text):
    return write_file(tmp, name, text)


def make_cert(kind):
    """A certificate for bench.local in meshgate's, nginx's and HAProxy's layouts."""
    d = os.path.join(tmp, kind.replace(" ", "_"))
    os.makedirs(d)
    subprocess.run(["openssl", "req", "-x509", "-nodes", *KEYS[kind], "-keyout", f"{d}/default.key", "-out", f"{d}/default.crt",
                    "-days", "30", "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}"], check=True, capture_output=True)
    with open(f"{d}/haproxy.pem", "w") as f:
        f.write(open(f"{d}/default.crt").read() + open(f"{d}/default.key").read())
    return d


def configs(d):
    nginx = nginx_conf(d, f"""upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}
server {{ listen 127.0.0.1:{PORTS['nginx']} ssl; ssl_certificate {d}/default.crt; ssl_certificate_key {d}/default.key;
ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}""")
    haproxy = haproxy_conf(f"127.0.0.1:{PORTS['haproxy']} ssl crt {d}/haproxy.pem alpn http/1.1", BACKEND_PORT,
                           "  tune.ssl.cachesize 0\n  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets\n")
    routes = f"""[[services]]
name = "bench"
tasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]
[[services.http]]
hosts = ["{HOST}"]
port = {BACKEND_PORT}
https_method = "noredirect"
"""
    return nginx, haproxy, routes


def wait_ready(port):
    deadline = time.time() + 20
    while time.time() < deadline:
        out = subprocess.run(["curl", "-sk", "--max-time", "1", "-H", f"Host: {HOST}", f"https://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
        if out == "ok":
            return
        time.sleep(0.1)
    sys.exit(f"port {port} did not answer 'ok' over HTTPS in time")


def run_wrk(port, conns, close):
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{SECONDS}s", "--latency", "-H", f"Host: {HOST}", *extra,
                          f"https://127.0.0.1:{port}/"], capture_output=True, text=True)
    if "Requests/sec:" not in out.stdout:
        sys.exit(f"wrk -c{conns} against port {port} gave no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    out = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "total": total, "p50": lat["50"], "p99": lat["99"], "errors": int(errors.group(1)) if errors else 0}


def run_rate(port):
    clients = 16
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", str(clients), f"--rps={RATE // clients}", "-D", str(SECONDS),
                          "-H", f":authority: {HOST}", f"https://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {"total": done, "mean": ms(mean.group(1), mean.group(2))}


def measure(proc, port, fn):
    before = cpu_seconds(proc)
    r = fn(port)
    r["cpu_per_1k"] = (cpu_seconds(proc) - before) / max(r["total"], 1) * 1000
    return r


def bench_key(kind, exe):
    d = make_cert(kind)
    nginx, haproxy, routes = configs(d)
    procs = {
        "meshgate": start([exe, "--routes-file", write(f"routes-{PORTS['meshgate']}.toml", routes), "--http-listen", "127.0.0.1:0",
                           "--tls-https-listen", f"127.0.0.1:{PORTS['meshgate']}", "--tls-certs-dir", d, "--admin-listen", "127.0.0.1:19091",
                           "--log-level", "warn", "--acme-enabled", "false"], PROXY_CPU,
                          {"TOKIO_WORKER_THREADS": "1", "MESHGATE_TLS_SESSION_RESUMPTION": "false"}),
        "nginx": start(["nginx", "-c", write_file(d, "nginx.conf", nginx)], PROXY_CPU),
        "haproxy": start(["haproxy", "-f", write_file(d, "haproxy.cfg", haproxy)], PROXY_CPU),
    }
    results = {name: {"handshake": [], "keepalive": [], "rate": []} for name in procs}
    try:
        for port in PORTS.values():
            wait_ready(port)
        for rnd in range(ROUNDS):
            for name, proc in procs.items():
                port = PORTS[name]
                h = measure(proc, port, lambda p: run_wrk(p, HANDSHAKE_CONNS, True))
                k = measure(proc, port, lambda p: run_wrk(p, KEEPALIVE_CONNS, False))
                r = measure(proc, port, run_rate)
                results[name]["handshake"].append(h)
                results[name]["keepalive"].append(k)
                results[name]["rate"].append(r)
                print(f"{kind} round {rnd + 1} {name:8} handshakes {h['rps']:>7.0f}/s (cpu {h['cpu_per_1k']:.3f}s/1k, errors {h['errors']}) "
                      f"keep-alive {k['rps']:>7.0f} req/s  rate={RATE}/s cpu {r['cpu_per_1k']:.3f}s/1k mean {r['mean']:.2f} ms", flush=True)
    finally:
        stop_all(list(procs.values()))
        time.sleep(0.5)
    return results


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    backend_conf = nginx_conf(tmp, f"server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 'ok'; }} }}")
    backend = start(["nginx", "-c", write("backend.conf", backend_conf)], LOAD_CPU)
    try:
        by_key = {kind: bench_key(kind, exe) for kind in KEYS}
    finally:
        stop_all([backend])
        shutil.rmtree(tmp, ignore_errors=True)
    report(by_key)


def report(by_key):
    cpu = benchlib.cpu_model()
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    haproxy_v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "## TLS: meshgate vs nginx vs HAProxy",
        "",
        f"Made by `bench/tls.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}, RATE={RATE}) on {time.strftime('%Y-%m-%d')}, 2 cores ({cpu}); "
        f"{nginx_v}; {haproxy_v}. Medians of {ROUNDS} interleaved rounds.",
        "Each server: one worker pinned to CPU 0, logging off, the same self-signed certificate, TLS 1.3 negotiated, session "
        "resumption off everywhere (full handshakes), proxying to the same backend (nginx `return 200 'ok'`, CPU 1) with upstream "
        "keep-alive. Load on CPU 1. Handshakes: `wrk -t1 -c32 -H 'Connection: close'` (a new TCP connection and TLS handshake per "
        f"request). Kept-alive: `wrk -t1 -c{KEEPALIVE_CONNS}`. Fixed rate: `h2load --h1 -c16 --rps=RATE/16` over TLS.",
        "",
        "| key | server | handshakes/s | vs nginx | CPU s / 1k handshakes | kept-alive req/s | vs nginx | p99 ms | CPU s / 1k req at fixed rate | vs nginx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, results in by_key.items():
        n = results["nginx"]
        for name, r in results.items():
            lines.append(
                f"| {kind} | {name} | {med(r['handshake'], 'rps'):.0f} | {med(r['handshake'], 'rps') / med(n['handshake'], 'rps'):.2f} | "
                f"{med(r['handshake'], 'cpu_per_1k'):.3f} | {med(r['keepalive'], 'rps'):.0f} | {med(r['keepalive'], 'rps') / med(n['keepalive'], 'rps'):.2f} | "
                f"{med(r['keepalive'], 'p99'):.2f} | {med(r['rate'], 'cpu_per_1k'):.3f} | {med(r['rate'], 'cpu_per_1k') / med(n['rate'], 'cpu_per_1k'):.2f} |")
    replace_section("## TLS:", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
