"""Runs the proxy benchmark; see proxy.sh. Writes the proxy section of bench/RESULTS.md.

Fairness rules: every proxy gets one worker (nginx worker_processes 1, HAProxy nbthread 1,
meshgate TOKIO_WORKER_THREADS=1) pinned to CPU 0; the backend (nginx answering a fixed 2-byte
body) and the load generator share CPU 1 (WORKERS=2: two workers each, every process free to
run on both cores, reported in a section of its own); logging is off everywhere (LOGGING=1: meshgate
writes JSON access lines to a file, nginx a JSON line with as many fields to a file, HAProxy
sits out: it logs through syslog only); every proxy keeps upstream connections alive and sets
X-Forwarded-For/X-Real-IP; rounds are interleaved so machine noise hits all proxies alike.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import benchlib
from benchlib import ROOT, cpu_seconds, ms, replace_section, require_free, rss_kib, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
RATE = int(os.environ.get("RATE", "4000"))
CONNS = [16, 64, 256]
BACKEND_PORT, PORTS = 18000, {"meshgate": 18081, "nginx": 18082, "haproxy": 18083}
# HTTP/2 without TLS (prior knowledge): meshgate on its one port, nginx and HAProxy on
# ports of their own (nginx's `http2` listener speaks nothing else).
H2C_PORTS = {"meshgate": 18081, "nginx": 18092, "haproxy": 18093}
WORKERS = int(os.environ.get("WORKERS", "1"))
# BASELINE=path/to/an/older/meshgate: measured beside the others in the same run (did a
# change cost anything?); it gets the routes file through `--routes`, which every version takes.
BASELINE = os.environ.get("BASELINE")
if BASELINE:
    PORTS["meshgate-before"] = 18084
# LOGGING=1: meshgate and nginx each logging and silent, in the same run.
LOGGING = os.environ.get("LOGGING") == "1"
if LOGGING:
    del PORTS["haproxy"]
    PORTS.update({"meshgate-silent": 18085, "nginx-silent": 18086})
HOST = "bench.local"
PROXY_CPU, LOAD_CPU = ("0", "1") if WORKERS == 1 else ("0,1", "0,1")

tmp = tempfile.mkdtemp(prefix="meshgate-bench-")


def write(name, text):
    return write_file(tmp, name, text)


def nginx_conf(body, workers=1):
    return benchlib.nginx_conf(tmp, body, workers)


BACKEND = nginx_conf(f"server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 'ok'; }} }}", WORKERS)
# The fields of meshgate's JSON lines that nginx has variables for, as JSON, buffered as
# nginx users do (`buffer=64k flush=1s`; meshgate writes through a 64 KiB buffer too).
NGINX_LOG = f"""log_format json escape=json '{{"ClientAddr":"$remote_addr:$remote_port","ClientHost":"$remote_addr",'
'"DownstreamContentSize":$body_bytes_sent,"DownstreamStatus":$status,"Duration":"$request_time",'
'"OriginStatus":"$upstream_status","RequestAddr":"$http_host","RequestHost":"$host","RequestMethod":"$request_method",'
'"RequestPath":"$request_uri","RequestProtocol":"$server_protocol","RequestScheme":"$scheme","ServiceAddr":"$upstream_addr",'
'"StartUTC":"$time_iso8601","request_User-Agent":"$http_user_agent"}}';
access_log {tmp}/nginx-access.log json buffer=64k flush=1s;"""


def nginx_proxy(port, log, h2c_port=None):
    location = """location / { proxy_pass http://be; proxy_http_version 1.1;
proxy_set_header Connection ""; proxy_set_header Host $host; proxy_set_header X-Real-IP $remote_addr;
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }"""
    h2c = f"server {{ listen 127.0.0.1:{h2c_port} http2; {location} }}" if h2c_port else ""
    return nginx_conf(f"""{NGINX_LOG if log else ""} upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}
server {{ listen 127.0.0.1:{port}; {location} }} {h2c}""", WORKERS)


HAPROXY = benchlib.haproxy_conf(f"127.0.0.1:{PORTS.get('haproxy', 0)}\n  bind 127.0.0.1:{H2C_PORTS['haproxy']} proto h2",
                                BACKEND_PORT, threads=WORKERS)
ROUTES = f"""[[services]]
name = "bench"
tasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]
[[services.http]]
hosts = ["{HOST}"]
port = {BACKEND_PORT}
"""


def wait_ready(port):
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": HOST})
            if urllib.request.urlopen(req, timeout=1).read() == b"ok":
                return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"port {port} did not answer 'ok' in time")


def run_wrk(port, conns):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{SECONDS}s", "--latency",
                          "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "total": total, "p50": lat["50"], "p99": lat["99"],
            "errors": int(errors.group(1)) if errors else 0, "socket": sock.group(1) if sock else ""}


def run_h2c(port):
    """HTTP/2 with prior knowledge: 16 connections, 10 streams each."""
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", "-c16", "-m10", "-t1", "-D", str(SECONDS),
                          "-H", f":authority: {HOST}", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    done, ok = map(int, re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).groups())
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    return {"rps": rps, "total": done, "errors": done - ok}


def run_rate(port):
    clients = 16
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", str(clients), f"--rps={RATE // clients}",
                          "-D", str(SECONDS), "-H", f":authority: {HOST}", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {"total": done, "mean": ms(mean.group(1), mean.group(2))}


def main():
    require_free([BACKEND_PORT, *PORTS.values(), 19090, 19091, 19092])
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    backend = start(["nginx", "-c", write("backend.conf", BACKEND)], LOAD_CPU)
    def meshgate(port, admin, env):
        return start([exe, "--routes-file", write("routes.toml", ROUTES), "--http-listen", f"127.0.0.1:{port}",
                      "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warn"], PROXY_CPU, {"TOKIO_WORKER_THREADS": "1", **env})

    logs = {"MESHGATE_LOG_ACCESS": f"{tmp}/meshgate-access.log", "MESHGATE_LOG_ACCESS_FORMAT": "json"} if LOGGING else {}
    procs = {
        "meshgate": meshgate(PORTS["meshgate"], 19090, logs),
        "nginx": start(["nginx", "-c", write("nginx.conf", nginx_proxy(PORTS["nginx"], LOGGING, None if LOGGING else H2C_PORTS["nginx"]))],
                       PROXY_CPU),
    }
    if LOGGING:
        procs["meshgate-silent"] = meshgate(PORTS["meshgate-silent"], 19092, {})
        procs["nginx-silent"] = start(["nginx", "-c", write("nginx-silent.conf", nginx_proxy(PORTS["nginx-silent"], False))], PROXY_CPU)
    else:
        procs["haproxy"] = start(["haproxy", "-f", write("haproxy.cfg", HAPROXY)], PROXY_CPU)
    if BASELINE:
        procs["meshgate-before"] = start([BASELINE, "--routes", write("routes.toml", ROUTES), "--http-listen",
                                          f"127.0.0.1:{PORTS['meshgate-before']}", "--admin-listen", "127.0.0.1:19091",
                                          "--log-level", "warn"], PROXY_CPU, {"TOKIO_WORKER_THREADS": "1"})
    try:
        time.sleep(0.5)
        for name, port in PORTS.items():
            wait_ready(port)
        idle = {name: rss_kib(p, "VmRSS") for name, p in procs.items()}
        results = {name: {c: [] for c in CONNS + ["rate", "h2c"]} for name in procs}
        for rnd in range(ROUNDS):
            # Each round starts with another proxy: the first of a round ran slower in
            # every run so far (whichever it was), which must not fall on one of them.
            names = list(procs)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                proc = procs[name]
                for conns in CONNS:
                    before = cpu_seconds(proc)
                    r = run_wrk(PORTS[name], conns)
                    r["cpu_per_100k"] = (cpu_seconds(proc) - before) / r["total"] * 100_000
                    results[name][conns].append(r)
                    print(f"round {rnd + 1} {name:8} c={conns:<3} {r['rps']:>9.0f} req/s p50 {r['p50']:.2f} ms "
                          f"p99 {r['p99']:.2f} ms cpu/100k {r['cpu_per_100k']:.2f}s errors {r['errors']} {r['socket']}", flush=True)
                before = cpu_seconds(proc)
                r = run_rate(PORTS[name])
                r["cpu_per_100k"] = (cpu_seconds(proc) - before) / r["total"] * 100_000
                results[name]["rate"].append(r)
                print(f"round {rnd + 1} {name:8} rate={RATE}/s mean {r['mean']:.2f} ms cpu/100k {r['cpu_per_100k']:.2f}s", flush=True)
                if name in H2C_PORTS and not LOGGING:
                    before = cpu_seconds(proc)
                    r = run_h2c(H2C_PORTS[name])
                    r["cpu_per_100k"] = (cpu_seconds(proc) - before) / max(r["total"], 1) * 100_000
                    results[name]["h2c"].append(r)
                    print(f"round {rnd + 1} {name:8} h2c {r['rps']:>9.0f} req/s cpu/100k {r['cpu_per_100k']:.2f}s errors {r['errors']}", flush=True)
        peak = {name: rss_kib(p, "VmHWM") for name, p in procs.items()}
        report(results, idle, peak)
    finally:
        stop_all(list(procs.values()) + [backend])
        shutil.rmtree(tmp, ignore_errors=True)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def report(results, idle, peak):
    cpu = benchlib.cpu_model()
    versions = [subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()]
    if not LOGGING:
        versions.append(subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0])
    heading = "## HTTP proxy with access logs: meshgate vs nginx" if LOGGING else "## HTTP proxy: meshgate vs nginx vs HAProxy"
    if WORKERS != 1:
        heading = heading.replace(":", f", {WORKERS} workers each:", 1)
    placement = ("one worker pinned to CPU 0" if WORKERS == 1 else
                 f"{WORKERS} workers (nginx worker_processes, HAProxy nbthread, meshgate TOKIO_WORKER_THREADS), every process on both cores")
    logging = ("`meshgate` and `nginx` write a JSON access line per request to a file (meshgate: `log.access_format=json`, "
               "Traefik's fields; nginx: a `log_format escape=json` with the same fields it has, `buffer=64k`); "
               "`-silent`: the same without" if LOGGING else "logging off")
    lines = [
        heading,
        "",
        f"Made by `{'LOGGING=1 ' if LOGGING else ''}bench/proxy.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}, RATE={RATE}) on {time.strftime('%Y-%m-%d')}, "
        f"2 cores ({cpu}); {'; '.join(versions)}. Medians of {ROUNDS} interleaved rounds.",
        f"Each proxy: {placement}, {logging}, upstream keep-alive, X-Forwarded-For set. "
        f"Backend (nginx `return 200 'ok'`) and load generator on CPU {LOAD_CPU}. "
        f"Peak: `wrk -t1 -cN -d{SECONDS}s --latency`. Fixed rate: `h2load --h1 -c16 --rps=RATE/16`. "
        f"h2c: `h2load -c16 -m10` (HTTP/2 with prior knowledge, 16 connections x 10 streams).",
        "",
        "| proxy | conns | req/s | spread | vs nginx | vs HAProxy | p50 ms | p99 ms | CPU s / 100k req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for conns in CONNS:
        base = med(results["nginx"][conns], "rps")
        base_h = med(results["haproxy"][conns], "rps") if "haproxy" in results else None
        def vs_haproxy(runs):
            return f"{med(runs, 'rps') / base_h:.2f}" if base_h else "-"
        for name in results:
            runs = results[name][conns]
            lines.append(f"| {name} | {conns} | {med(runs, 'rps'):.0f} | {min(r['rps'] for r in runs):.0f}-{max(r['rps'] for r in runs):.0f} | "
                         f"{med(runs, 'rps') / base:.2f} | {vs_haproxy(runs)} | {med(runs, 'p50'):.2f} | "
                         f"{med(runs, 'p99'):.2f} | {med(runs, 'cpu_per_100k'):.2f} | {sum(r['errors'] for r in runs)} |")
    lines += ["", f"Fixed offered rate, {RATE} req/s over 16 keep-alive connections:", "",
              "| proxy | mean latency ms | CPU s / 100k req | vs nginx | idle RSS MiB | peak RSS MiB |", "|---|---|---|---|---|---|"]
    base = med(results["nginx"]["rate"], "cpu_per_100k")
    for name in results:
        runs = results[name]["rate"]
        lines.append(f"| {name} | {med(runs, 'mean'):.2f} | {med(runs, 'cpu_per_100k'):.2f} | {med(runs, 'cpu_per_100k') / base:.2f} | "
                     f"{idle[name] / 1024:.1f} | {peak[name] / 1024:.1f} |")
    if any(results[name]["h2c"] for name in results):
        lines += ["", "HTTP/2 without TLS (h2c), 16 connections x 10 streams:", "",
                  "| proxy | req/s | spread | vs HAProxy | vs nginx | CPU s / 100k req | errors |", "|---|---|---|---|---|---|---|"]
        base_h, base_n = med(results["haproxy"]["h2c"], "rps"), med(results["nginx"]["h2c"], "rps")
        for name in results:
            runs = results[name]["h2c"]
            if runs:
                lines.append(f"| {name} | {med(runs, 'rps'):.0f} | {min(r['rps'] for r in runs):.0f}-{max(r['rps'] for r in runs):.0f} | "
                             f"{med(runs, 'rps') / base_h:.2f} | {med(runs, 'rps') / base_n:.2f} | {med(runs, 'cpu_per_100k'):.2f} | "
                             f"{sum(r['errors'] for r in runs)} |")
    if BASELINE:
        lines += ["", f"`meshgate-before`: `{BASELINE}` (BASELINE=), the same measurements in the same run."]
    if LOGGING:
        lines += ["", "What logging costs each (req/s logging / silent) and meshgate's ratio to nginx both ways:", "",
                  "| conns | meshgate logging/silent | nginx logging/silent | meshgate/nginx logging | meshgate/nginx silent |",
                  "|---|---|---|---|---|"]
        for conns in CONNS:
            rps = {name: med(results[name][conns], "rps") for name in results}
            lines.append(f"| {conns} | {rps['meshgate'] / rps['meshgate-silent']:.2f} | {rps['nginx'] / rps['nginx-silent']:.2f} | "
                         f"{rps['meshgate'] / rps['nginx']:.2f} | {rps['meshgate-silent'] / rps['nginx-silent']:.2f} |")
    replace_section(heading.split(":")[0] + ":", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
