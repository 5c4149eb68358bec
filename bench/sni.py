"""Runs the SNI benchmark; see sni.sh. Writes its section of bench/RESULTS.md.

Full TLS handshakes per second for one name when the server holds 1 certificate, and when
it holds 1,000 (one per name, ECDSA P-256): the certificate lookup by SNI must not slow
down as certificates grow. meshgate (certificates directory), nginx (a server block per
name) and HAProxy (`crt` on a directory) side by side, with the same fairness rules as the
TLS benchmark: one worker each pinned to CPU 0, logging off, session resumption off, the
backend and the load generator on CPU 1. The measured name is `localhost`, so that wrk
sends it as SNI without touching /etc/hosts.
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
from benchlib import ROOT, cpu_seconds, haproxy_conf, nginx_conf, replace_section, require_free, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
HANDSHAKE_CONNS = 32  # as bench/tls.py
BACKEND_PORT = 18000
PROXY_CPU, LOAD_CPU = "0", "1"
COUNTS = [1, 1000]
NAME = "localhost"
SERVERS = ["meshgate", "nginx", "haproxy"]
PORT = {(s, n): 18460 + i * 2 + j for i, s in enumerate(SERVERS) for j, n in enumerate(COUNTS)}

tmp = tempfile.mkdtemp(prefix="meshgate-bench-sni-")


def names(count):
    """The measured name, then made-up others."""
    return [NAME] + [f"h{i}.sni.bench.test" for i in range(1, count)]


def make_certs(count):
    """One ECDSA certificate per name: `<name>.crt/.key` (meshgate, nginx) and `<name>.pem`
    (HAProxy), in a directory of their own."""
    d = os.path.join(tmp, f"certs-{count}")
    pems = os.path.join(d, "haproxy")
    os.makedirs(pems)
    for name in names(count):
        subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.crt", "-days", "30", "-subj", f"/CN={name}",
                        "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
        with open(f"{pems}/{name}.pem", "w") as f:
            f.write(open(f"{d}/{name}.crt").read() + open(f"{d}/{name}.key").read())
    return d


def servers(count, d, exe):
    """The three servers holding `count` certificates."""
    port = {s: PORT[(s, count)] for s in SERVERS}
    blocks = "\n".join(
        f"server {{ listen 127.0.0.1:{port['nginx']} ssl; server_name {n}; ssl_certificate {d}/{n}.crt; "
        f"ssl_certificate_key {d}/{n}.key; location / {{ proxy_pass http://be; proxy_http_version 1.1; "
        f"proxy_set_header Connection \"\"; proxy_set_header Host $host; }} }}"
        for n in names(count))
    nginx = nginx_conf(d, f"""upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}
ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
server_names_hash_bucket_size 128;
{blocks}""")
    haproxy = haproxy_conf(f"127.0.0.1:{port['haproxy']} ssl crt {d}/haproxy/ alpn http/1.1", BACKEND_PORT,
                           "  tune.ssl.cachesize 0\n  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets\n")
    routes = f"""[[services]]
name = "bench"
tasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]
[[services.http]]
hosts = ["{NAME}"]
port = {BACKEND_PORT}
https_method = "noredirect"
"""
    return {
        "meshgate": start([exe, "--routes-file", write_file(d, "routes.toml", routes), "--http-listen", "127.0.0.1:0",
                           "--tls-https-listen", f"127.0.0.1:{port['meshgate']}", "--tls-certs-dir", d,
                           "--admin-listen", "127.0.0.1:0", "--log-level", "warn", "--acme-enabled", "false"], PROXY_CPU,
                          {"TOKIO_WORKER_THREADS": "1", "MESHGATE_TLS_SESSION_RESUMPTION": "false"}),
        "nginx": start(["nginx", "-c", write_file(d, "nginx.conf", nginx)], PROXY_CPU),
        "haproxy": start(["haproxy", "-f", write_file(d, "haproxy.cfg", haproxy)], PROXY_CPU),
    }


def wait_ready(port):
    """Until a verified handshake for `localhost` (its own certificate, not a default) answers 'ok'."""
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["curl", "-s", "--max-time", "1", "--cacert", os.path.join(tmp, "certs-1", f"{NAME}.crt"),
                              f"https://{NAME}:{port}/"], capture_output=True, text=True).stdout
        if out == "ok":
            return
        time.sleep(0.2)
    sys.exit(f"port {port} did not answer 'ok' for {NAME} with its own certificate in time")


def main():
    require_free(list(PORT.values()) + [BACKEND_PORT])
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    backend_conf = nginx_conf(tmp, f"server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 'ok'; }} }}")
    procs = {"backend": start(["nginx", "-c", write_file(tmp, "backend.conf", backend_conf)], LOAD_CPU)}
    results = {(s, n): [] for s in SERVERS for n in COUNTS}
    try:
        dirs = {n: make_certs(n) for n in COUNTS}
        # The measured name's certificate is the same file in both sets: copy it over.
        for ext in ("crt", "key"):
            shutil.copy(f"{dirs[1]}/{NAME}.{ext}", f"{dirs[1000]}/{NAME}.{ext}")
        shutil.copy(f"{dirs[1]}/haproxy/{NAME}.pem", f"{dirs[1000]}/haproxy/{NAME}.pem")
        for n in COUNTS:
            for s, p in servers(n, dirs[n], exe).items():
                procs[(s, n)] = p
        for key in results:
            wait_ready(PORT[key])
        for rnd in range(ROUNDS):
            for n in COUNTS:
                for s in SERVERS:
                    proc = procs[(s, n)]
                    before = cpu_seconds(proc)
                    r = run_wrk_url(PORT[(s, n)])
                    r["cpu_per_1k"] = (cpu_seconds(proc) - before) / max(r["total"], 1) * 1000
                    results[(s, n)].append(r)
                    print(f"round {rnd + 1} {s:8} {n:>5} certificates: {r['rps']:>7.0f} handshakes/s "
                          f"(cpu {r['cpu_per_1k']:.3f}s/1k, errors {r['errors']})", flush=True)
    finally:
        stop_all(list(procs.values()))
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def run_wrk_url(port):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{HANDSHAKE_CONNS}", f"-d{SECONDS}s", "--latency",
                          "-H", "Connection: close", f"https://{NAME}:{port}/"], capture_output=True, text=True)
    if "Requests/sec:" not in out.stdout:
        sys.exit(f"wrk against port {port} gave no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    total = int(re.search(r"(\d+) requests in", out.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return {"rps": rps, "total": total, "errors": int(errors.group(1)) if errors else 0}


def report(results):
    med = lambda key, field: statistics.median(r[field] for r in results[key])
    spread = lambda key: f"{min(r['rps'] for r in results[key]):.0f}–{max(r['rps'] for r in results[key]):.0f}"
    cpu = benchlib.cpu_model()
    lines = [
        "## SNI: TLS handshakes with 1 and with 1,000 certificates",
        "",
        f"Made by `bench/sni.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}) on {time.strftime('%Y-%m-%d')}, 2 cores ({cpu}). "
        f"Medians of {ROUNDS} interleaved rounds (spread in brackets). Full TLS 1.3 handshakes for `{NAME}` "
        f"(`wrk -t1 -c{HANDSHAKE_CONNS} -H 'Connection: close' https://{NAME}:PORT/`, SNI `{NAME}`), each server holding "
        "1 certificate or 1,000 (ECDSA P-256, one per name; nginx a server block per name, HAProxy `crt` on a directory). "
        "One worker each on CPU 0, session resumption off, logging off; backend and load on CPU 1.",
        "",
        "| server | 1 certificate: handshakes/s | 1,000: handshakes/s | 1,000 / 1 | CPU s / 1k handshakes (1) | (1,000) |",
        "|---|---|---|---|---|---|",
    ]
    for s in SERVERS:
        one, many = (s, 1), (s, 1000)
        lines.append(f"| {s} | {med(one, 'rps'):.0f} ({spread(one)}) | {med(many, 'rps'):.0f} ({spread(many)}) | "
                     f"{med(many, 'rps') / med(one, 'rps'):.2f} | {med(one, 'cpu_per_1k'):.3f} | {med(many, 'cpu_per_1k'):.3f} |")
    replace_section("## SNI: TLS handshakes with 1 and with 1,000 certificates", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
