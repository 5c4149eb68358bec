"""Runs the middleware chain benchmark; see chain.sh. Writes its section of bench/RESULTS.md.

One meshgate and one nginx, each one worker pinned to CPU 0; the backend (nginx `return
200 'ok'`) and wrk on CPU 1; logging off; upstream keep-alive. Each has 1,000 routes
(`r<n>.bench.local`) and three measured hosts: `plain` (no chain), `apr1` and `bcrypt` (the
chain: a request header set, a response header set, basic auth with that user's hash, and a
rate limit per client address of a million requests a second, so nothing is refused).
Rounds are interleaved.
"""

import base64
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
from benchlib import ROOT, cpu_seconds, replace_section, require_free, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
CONNS = int(os.environ.get("CONNS", "64"))
BACKEND_PORT, PORTS = 18000, {"meshgate": 18081, "nginx": 18082}
HOSTS = ["plain", "apr1", "bcrypt"]
ROUTES = 1000
PROXY_CPU, LOAD_CPU = "0", "1"
USER, PASSWORD = "bench", "s3cret-bench"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

tmp = tempfile.mkdtemp(prefix="meshgate-chain-")


def write(name, text):
    return write_file(tmp, name, text)


def htpasswd(flag):
    out = subprocess.run(["htpasswd", "-nb" + flag, USER, PASSWORD], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def meshgate_routes(users):
    out = []
    for n in range(ROUTES):
        out.append(f'[[services]]\nname = "r{n}"\ntasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]\n'
                   f'[[services.http]]\nhosts = ["r{n}.bench.local"]\nport = {BACKEND_PORT}\n')
    for host in HOSTS:
        out.append(f'[[services]]\nname = "{host}"\ntasks = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]\n'
                   f'[[services.http]]\nhosts = ["{host}.bench.local"]\nport = {BACKEND_PORT}\n')
        if host != "plain":
            out.append('middlewares = [\n'
                       '  { kind = "headers", request = [["x-script-name", "bench"]], response = [["x-frame-options", "DENY"]] },\n'
                       f'  {{ kind = "basic_auth", users = ["{users[host]}"], realm = "bench", remove_header = false }},\n'
                       '  { kind = "rate_limit", average = 1000000, period_ms = 1000, burst = 1000000, source = "client_ip" },\n'
                       ']\n')
    return "\n".join(out)


def nginx_proxy(port, files):
    servers = [f"server {{ listen 127.0.0.1:{port}; server_name r{n}.bench.local; location / {{ proxy_pass http://be; }} }}"
               for n in range(ROUTES)]
    common = ('proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host; '
              "proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
    for host in HOSTS:
        chain = ""
        if host != "plain":
            chain = (f'proxy_set_header X-Script-Name bench; add_header X-Frame-Options DENY; auth_basic "bench"; '
                     f"auth_basic_user_file {files[host]}; limit_req zone=perip burst=1000000 nodelay;")
        servers.append(f"server {{ listen 127.0.0.1:{port}; server_name {host}.bench.local; location / {{ {common} {chain} }} }}")
    return benchlib.nginx_conf(tmp, f"""upstream be {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}
limit_req_zone $binary_remote_addr zone=perip:10m rate=1000000r/s; server_names_hash_bucket_size 128;
server_names_hash_max_size 4096; {" ".join(servers)}""")


def wait_ready(port, host):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"{host}.bench.local", "Authorization": AUTH})
            if urllib.request.urlopen(req, timeout=1).read() == b"ok":
                return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"port {port} host {host} did not answer 'ok' in time")


def run_wrk(port, host):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency",
                          "-H", f"Host: {host}.bench.local", "-H", f"Authorization: {AUTH}", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "total": total, "errors": int(errors.group(1)) if errors else 0}


def main():
    require_free([BACKEND_PORT, *PORTS.values(), 19090])
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    users = {"apr1": htpasswd("m"), "bcrypt": htpasswd("B")}
    files = {h: write(f"{h}.htpasswd", users[h] + "\n") for h in users}
    backend = start(["nginx", "-c", write("backend.conf", benchlib.nginx_conf(tmp, f"server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 'ok'; }} }}"))], LOAD_CPU)
    procs = {
        "meshgate": start([exe, "--routes-file", write("routes.toml", meshgate_routes(users)), "--http-listen",
                           f"127.0.0.1:{PORTS['meshgate']}", "--admin-listen", "127.0.0.1:19090", "--log-level", "warn"],
                          PROXY_CPU, {"TOKIO_WORKER_THREADS": "1"}),
        "nginx": start(["nginx", "-c", write("nginx.conf", nginx_proxy(PORTS["nginx"], files))], PROXY_CPU),
    }
    try:
        for name, port in PORTS.items():
            for host in HOSTS:
                wait_ready(port, host)
        results = {name: {h: [] for h in HOSTS} for name in procs}
        for rnd in range(ROUNDS):
            names = list(procs)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                for host in HOSTS:
                    before = cpu_seconds(procs[name])
                    r = run_wrk(PORTS[name], host)
                    r["cpu_per_100k"] = (cpu_seconds(procs[name]) - before) / r["total"] * 100_000
                    results[name][host].append(r)
                    print(f"round {rnd + 1} {name:8} {host:6} {r['rps']:>9.0f} req/s cpu/100k {r['cpu_per_100k']:.2f}s errors {r['errors']}", flush=True)
        report(results)
    finally:
        stop_all(list(procs.values()) + [backend])
        shutil.rmtree(tmp, ignore_errors=True)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def report(results):
    cpu = benchlib.cpu_model()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [
        "## Middleware chain: meshgate vs nginx",
        "",
        f"Made by `bench/chain.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}, CONNS={CONNS}) on {time.strftime('%Y-%m-%d')}, "
        f"2 cores ({cpu}); {nginx}. Medians of {ROUNDS} interleaved rounds; spread: min-max req/s.",
        f"{ROUTES} routes besides the measured ones. Chain: a request header, a response header, basic auth "
        "(apr1 or bcrypt user, the right password on every request), a per-address rate limit of 1,000,000/s "
        "(nginx: `proxy_set_header`, `add_header`, `auth_basic`, `limit_req ... nodelay`). One worker each on CPU 0; "
        "backend and `wrk -t1 -c{CONNS}` on CPU 1; logging off.".replace("{CONNS}", str(CONNS)),
        "",
        "| proxy | route | req/s (min-max) | vs its plain route | CPU s / 100k req | CPU vs its plain | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results:
        plain = results[name]["plain"]
        for host in HOSTS:
            runs = results[name][host]
            spread = f"{min(r['rps'] for r in runs):.0f}-{max(r['rps'] for r in runs):.0f}"
            lines.append(f"| {name} | {host} | {med(runs, 'rps'):.0f} ({spread}) | {med(runs, 'rps') / med(plain, 'rps'):.2f} | "
                         f"{med(runs, 'cpu_per_100k'):.2f} | {med(runs, 'cpu_per_100k') / med(plain, 'cpu_per_100k'):.2f} | "
                         f"{sum(r['errors'] for r in runs)} |")
    lines += ["", "meshgate / nginx, req/s on the same route: " + ", ".join(
        f"{h} {med(results['meshgate'][h], 'rps') / med(results['nginx'][h], 'rps'):.2f}" for h in HOSTS) + "."]
    replace_section("## Middleware chain:", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
