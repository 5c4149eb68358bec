"""DNS benchmark; see dns.sh. Every server gets one thread pinned to CPU 0 (mesh-dns:
TOKIO_WORKER_THREADS=1, unbound num-threads 1, dnsmasq is single-threaded), logging off;
dnsperf runs on CPU 1. The same 100 local names (A records) are served by all three; the
forwarded names come from one upstream dnsmasq (CPU 1) and are answered from each server's
cache after a warm-up pass."""

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from benchlib import ROOT, core_busy_seconds, cpu_model, replace_section, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
# The fixed offered rate (queries/s) at which each server's CPU per query is measured: below
# every server's peak, so that the figure is the work per query, not the load generator's.
RATE = int(os.environ.get("RATE", "50000"))
PORTS = {"meshgate": 15401, "dnsmasq": 15402, "unbound": 15403}
UPSTREAM = 15404
NAMES = 100
tmp = tempfile.mkdtemp(prefix="meshgate-dnsbench-")


def write(name, text):
    return write_file(tmp, name, text)


def addr(i):
    return f"10.50.{i // 250}.{i % 250 + 1}"


def dnsperf(port, queries, rate=200000):
    """One dnsperf run; with it, how busy the server's core (CPU 0) was and its CPU time per query."""
    before = core_busy_seconds(0)
    out = subprocess.run(["taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries,
                          "-l", str(SECONDS), "-c", "4", "-Q", str(rate), "-q", "200"], capture_output=True, text=True).stdout
    busy = core_busy_seconds(0) - before
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    lat = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    return {"qps": qps, "lat_ms": lat, "lost": lost, "busy": busy / SECONDS, "us_per_q": busy / max(done, 1) * 1e6}


def main():
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    routes = "".join(f'[[services]]\nname = "svc{i}"\ntasks = [{{ address = "{addr(i)}" }}]\n\n' for i in range(NAMES))
    local = write("local.txt", "".join(f"svc{i}.mesh.internal A\n" for i in range(NAMES)))
    forwarded = write("fwd.txt", "".join(f"name{i}.fwd.test A\n" for i in range(NAMES)))
    hosts = "".join(f"--host-record=svc{i}.mesh.internal,{addr(i)}\n" for i in range(NAMES)).split()
    unbound_conf = write("unbound.conf", f"""server:
  interface: 127.0.0.1
  port: {PORTS['unbound']}
  num-threads: 1
  do-daemonize: no
  use-syslog: no
  verbosity: 0
  username: ""
  chroot: ""
  pidfile: ""
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  local-zone: "mesh.internal." static
""" + "".join(f'  local-data: "svc{i}.mesh.internal. 5 IN A {addr(i)}"\n' for i in range(NAMES)) + f"""
forward-zone:
  name: "fwd.test."
  forward-addr: 127.0.0.1@{UPSTREAM}
""")
    procs = {}
    upstream = start(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={UPSTREAM}",
                      "--no-resolv", "--no-hosts", "--address=/fwd.test/192.0.2.9", "--local-ttl=300", "--pid-file="], "1")
    try:
        procs["meshgate"] = start([exe, "--routes-file", write("routes.toml", routes), "--docker-mode", "off", "--http-listen", "127.0.0.1:0",
                                   "--admin-listen", "127.0.0.1:0", "--dns-listen", f"127.0.0.1:{PORTS['meshgate']}",
                                   "--dns-upstreams", f"127.0.0.1:{UPSTREAM}", "--log-level", "warn",
                                   # dnsperf is one client at full speed; the peers have no rate limit either.
                                   "--dns-udp-rate-limit", "0"], "0", {"TOKIO_WORKER_THREADS": "1"})
        procs["dnsmasq"] = start(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--bind-interfaces", "--listen-address=127.0.0.1",
                                  f"--port={PORTS['dnsmasq']}", "--no-resolv", "--no-hosts", "--pid-file=", "--cache-size=10000",
                                  f"--server=/fwd.test/127.0.0.1#{UPSTREAM}", "--local-ttl=5"] + hosts, "0")
        procs["unbound"] = start(["unbound", "-d", "-c", unbound_conf], "0")
        time.sleep(1.5)
        for name, port in PORTS.items():
            check = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "svc7.mesh.internal"], capture_output=True, text=True).stdout.strip()
            assert check == addr(7), f"{name} does not answer svc7.mesh.internal ({check!r})"
            for i in range(NAMES):  # warm the caches
                subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", f"name{i}.fwd.test"], capture_output=True)
        results = {n: {"local": [], "forwarded": [], "local-rate": [], "forwarded-rate": []} for n in PORTS}
        for rnd in range(ROUNDS):
            names = list(PORTS)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                port = PORTS[name]
                for kind, qfile in (("local", local), ("forwarded", forwarded)):
                    for leg, rate in ((kind, 200000), (f"{kind}-rate", RATE)):
                        r = dnsperf(port, qfile, rate)
                        results[name][leg].append(r)
                        print(f"round {rnd + 1} {name:8} {leg:14} {r['qps']:>9.0f} q/s avg {r['lat_ms']:.3f} ms lost {r['lost']} "
                              f"CPU 0 busy {r['busy'] * 100:.0f}% {r['us_per_q']:.2f} us/query", flush=True)
        report(results)
    finally:
        stop_all(list(procs.values()) + [upstream])
        shutil.rmtree(tmp, ignore_errors=True)


def report(results):
    med = lambda runs, k: statistics.median(r[k] for r in runs)
    spread = lambda runs, k: f"{min(r[k] for r in runs):.0f}-{max(r[k] for r in runs):.0f}"
    lines = ["## DNS: mesh-dns vs dnsmasq vs unbound", "",
             f"Made by `bench/dns.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}, RATE={RATE}) on {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores ({cpu_model()}). Medians of {ROUNDS} interleaved rounds (each round starts with another server), "
             "the spread beside. Each server: one thread on CPU 0, logging off. "
             f"`dnsperf -c 4 -q 200 -l {SECONDS}` on CPU 1 over {NAMES} names: local A records, and forwarded names "
             "answered from each server's warm cache (upstream: a dnsmasq on CPU 1). CPU 0 busy: its share of the "
             "run spent on anything but idle (the server alone runs there; its packets' kernel work counts). "
             "Capacity: queries/s over that share, what the server would answer with its core to itself.", "",
             "| server | names | queries/s (spread) | CPU 0 busy | µs of CPU 0 / query | capacity q/s | vs dnsmasq | vs unbound "
             f"| µs / query at {RATE} q/s | avg latency ms | lost |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("local", "forwarded"):
        cap = {n: med(results[n][kind], "qps") / max(med(results[n][kind], "busy"), 1e-9) for n in results}
        for name in results:
            runs, fixed = results[name][kind], results[name][f"{kind}-rate"]
            lost = sum(r["lost"] for r in runs), sum(r["lost"] for r in fixed)
            lines.append(f"| {name} | {kind} | {med(runs, 'qps'):.0f} ({spread(runs, 'qps')}) | {med(runs, 'busy') * 100:.0f}% "
                         f"| {med(runs, 'us_per_q'):.2f} | {cap[name]:.0f} | {cap[name] / cap['dnsmasq']:.2f} | {cap[name] / cap['unbound']:.2f} "
                         f"| {med(fixed, 'us_per_q'):.2f} | {med(runs, 'lat_ms'):.3f} | {lost[0]} (at {RATE}: {lost[1]}) |")
    replace_section("## DNS:", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
