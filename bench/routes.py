"""Does a request cost more as the routing table grows? See routes.sh. Writes the "Route
table size" section of bench/RESULTS.md.

For each size N (ROUTE_COUNTS, default 1,1000,10000,100000): a routes file of N services, each
with an exact host `sI.example` and a wildcard `*.wI.example`, all to one backend (nginx
answering `ok`, on CPU 1 with the load generator). Each proxy (meshgate; BASELINE=an older
meshgate binary, measured beside it; nginx with the same N server blocks, its names hashed, up
to NGINX_MAX services: at 100,000 it needs some 5 GB, twice that while reloading) runs one
worker pinned to CPU 0. Measured: the time from start to the first request served, RSS then,
requests/s (`wrk -t1 -c64`) to the last service's exact host and to a name under its
wildcard, the time a reload takes (SIGHUP after the file gained one service, until that
service answers), and RSS after 3 reloads. ROUNDS interleaved rounds (the proxies' order
turns each round); medians, with the spread.

Then host regexes (REGEX_COUNTS, default 1,100,1000): R services with a regex host each
(`~^rI-[a-z]+\.example$`), requests to a name only the last one matches.
"""

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import benchlib
from benchlib import ROOT, replace_section, require_free, rss_kib, start, stop_all, write_file

SECONDS = int(os.environ.get("SECONDS_PER_RUN", "5"))
COUNTS = [int(n) for n in os.environ.get("ROUTE_COUNTS", "1,1000,10000,100000").split(",")]
REGEX_COUNTS = [int(n) for n in os.environ.get("REGEX_COUNTS", "1,100,1000").split(",") if n]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
NGINX_MAX = int(os.environ.get("NGINX_MAX", "10000"))
# The baseline is an older build: up to this many services (an older build may load 100,000
# in minutes, not seconds).
BASELINE_MAX = int(os.environ.get("BASELINE_MAX", "10000"))
BASELINE = os.environ.get("BASELINE")
BACKEND_PORT, PORT = 18000, 18090
PROXY_CPU, LOAD_CPU = "0", "1"
tmp = tempfile.mkdtemp(prefix="meshgate-routes-")


def regex_host(i):
    return f"^r{i}-[a-z]+\\.example$"


def routes(n, extra=0, regex=False):
    out = []
    for i in range(n + extra):
        hosts = f'"~{regex_host(i)}"'.replace("\\", "\\\\") if regex else f'"s{i}.example", "*.w{i}.example"'
        out.append(f'[[services]]\nname = "s{i}"\ntasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]\n'
                   f'[[services.http]]\nhosts = [{hosts}]\nport = {BACKEND_PORT}\n')
    return "".join(out)


def nginx_routes(n, extra=0, regex=False):
    names = (lambda i: f"~{regex_host(i)}") if regex else (lambda i: f"s{i}.example *.w{i}.example")
    servers = "".join(f"server {{ listen 127.0.0.1:{PORT}; server_name {names(i)}; "
                      f"location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; "
                      f"proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}\n"
                      for i in range(n + extra))
    # Unknown names get 404, as from meshgate (else nginx's first server would answer them).
    default = f"server {{ listen 127.0.0.1:{PORT} default_server; return 404; }}\n"
    return benchlib.nginx_conf(tmp, f"server_names_hash_max_size 1048576; server_names_hash_bucket_size 128; "
                                    f"upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }} {default}{servers}")


def answers(host):
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{PORT}/", headers={"Host": host})
        return urllib.request.urlopen(req, timeout=1).read() == b"ok"
    except Exception:
        return False


def wait_for(host, limit=120):
    started = time.time()
    while time.time() - started < limit:
        if answers(host):
            return time.time() - started
        time.sleep(0.01)
    sys.exit(f"{host} was not served within {limit} s")


def wrk(host):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{SECONDS}s", "-H", f"Host: {host}",
                          f"http://127.0.0.1:{PORT}/"], capture_output=True, text=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        sys.exit(f"{host}: {errors.group(1)} errors\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def measure(name, n, regex=False):
    """One proxy with n services (regex: a host regex each): start, requests/s, reloads, RSS."""
    routes_file = write_file(tmp, f"routes-{name}.toml", routes(n, regex=regex))
    conf = write_file(tmp, f"nginx-{n}.conf", nginx_routes(n, regex=regex))
    if name == "nginx":
        cmd = ["nginx", "-c", conf]
    else:
        exe = BASELINE if name == "meshgate-before" else os.path.join(ROOT, "target", "release", "meshgate")
        cmd = [exe, "--routes-file", routes_file, "--http-listen", f"127.0.0.1:{PORT}", "--admin-listen",
               "127.0.0.1:19093", "--log-level", "warn", "--docker-mode", "off"]
    proc = start(cmd, PROXY_CPU, {"TOKIO_WORKER_THREADS": "1"})
    last = f"r{n - 1}-abc.example" if regex else f"s{n - 1}.example"
    try:
        startup = wait_for(last)
        rss_start = rss_kib(proc, "VmRSS") / 1024
        if regex:
            return {"startup": startup, "rss_start": rss_start, "regex": wrk(last)}
        exact = wrk(last)
        wildcard = wrk(f"x.w{n - 1}.example")
        reloads = []
        for extra in (1, 2, 3):
            if name == "nginx":
                write_file(tmp, f"nginx-{n}.conf", nginx_routes(n, extra))
            else:
                write_file(tmp, f"routes-{name}.toml", routes(n, extra))
            began = time.time()
            os.kill(proc.pid, signal.SIGHUP)  # taskset execs the proxy: its pid is the group's
            wait_for(f"s{n + extra - 1}.example")
            reloads.append(time.time() - began)
        time.sleep(1)
        rss_after = rss_kib(proc, "VmRSS") / 1024
    finally:
        stop_all([proc])
    return {"startup": startup, "rss_start": rss_start, "exact": exact, "wildcard": wildcard,
            "reload": statistics.median(reloads), "rss_after": rss_after}


def rounds_of(names, sizes, regex):
    """ROUNDS interleaved rounds over sizes x proxies; the proxies' order turns each round."""
    runs = {}
    for n in sizes:
        for rnd in range(ROUNDS):
            limits = {"nginx": NGINX_MAX, "meshgate-before": BASELINE_MAX}
            todo = [x for x in names if n <= limits.get(x, n)]
            for name in todo[rnd % len(todo):] + todo[:rnd % len(todo)]:
                r = measure(name, n, regex)
                print(f"round {rnd + 1} {name:15} n={n:<7} {'regex ' if regex else ''}"
                      + " ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
                runs.setdefault((name, n), []).append(r)
    return runs


def cell(runs, key, fmt):
    values = [r[key] for r in runs]
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    require_free([BACKEND_PORT, PORT, 19093])
    backend = start(["nginx", "-c", write_file(tmp, "backend.conf", benchlib.nginx_conf(
        tmp, f"server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 'ok'; }} }}"))], LOAD_CPU)
    names = ["meshgate"] + (["meshgate-before"] if BASELINE else []) + ["nginx"]
    try:
        time.sleep(0.5)
        plain = rounds_of(names, COUNTS, regex=False)
        regexes = rounds_of(names, REGEX_COUNTS, regex=True)
    finally:
        stop_all([backend])
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [
        "## Route table size: cost per request, startup, reload and memory",
        "",
        f"Made by `bench/routes.sh` (ROUTE_COUNTS={','.join(map(str, COUNTS))}, "
        f"REGEX_COUNTS={','.join(map(str, REGEX_COUNTS))}, ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}"
        f"{', BASELINE=the previous build' if BASELINE else ''}) on {time.strftime('%Y-%m-%d')}, 2 cores "
        f"({benchlib.cpu_model()}); {nginx_version}. Medians of {ROUNDS} interleaved rounds, the spread (min-max) in brackets.",
        "N services, each with an exact host and a `*.wI.example` wildcard, to one backend (nginx `return 200`, CPU 1 "
        "with `wrk -t1 -c64`); each proxy one worker on CPU 0. Requests go to the last service's names. Reload: the "
        f"file gains a service, SIGHUP (nginx: its reload), until the new service answers (median of 3). nginx up to "
        f"{NGINX_MAX} services (at 100,000 it needs some 5 GB, twice that while reloading)"
        f"{f', the baseline up to {BASELINE_MAX}' if BASELINE else ''}.",
        "",
        "| proxy | services | start s | RSS MiB | KiB per service | exact req/s | wildcard req/s | reload s | RSS after 3 reloads MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {name: statistics.median(r["rss_start"] for r in runs) for (name, n), runs in plain.items() if n == min(COUNTS)}
    for (name, n), runs in plain.items():
        rss = statistics.median(r["rss_start"] for r in runs)
        per = f"{(rss - base.get(name, rss)) * 1024 / n:.1f}" if n >= 1000 else "-"
        lines.append(f"| {name} | {n} | {cell(runs, 'startup', '{:.2f}')} | {rss:.1f} | {per} | {cell(runs, 'exact', '{:.0f}')} | "
                     f"{cell(runs, 'wildcard', '{:.0f}')} | {cell(runs, 'reload', '{:.2f}')} | "
                     f"{statistics.median(r['rss_after'] for r in runs):.1f} |")
    if regexes:
        lines += [
            "",
            "Host regexes: R services with one regex host each (`~^rI-[a-z]+\\.example$`), requests to a name only the "
            "last one matches (meshgate: the regexes matched as one set; nginx: tried in turn, as its docs say).",
            "",
            "| proxy | regex hosts | start s | RSS MiB | req/s |",
            "|---|---|---|---|---|",
        ]
        for (name, n), runs in regexes.items():
            lines.append(f"| {name} | {n} | {cell(runs, 'startup', '{:.2f}')} | "
                         f"{statistics.median(r['rss_start'] for r in runs):.1f} | {cell(runs, 'regex', '{:.0f}')} |")
    replace_section("## Route table size", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
