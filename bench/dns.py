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

from benchlib import ROOT, replace_section, start, stop_all, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
PORTS = {"meshgate": 15401, "dnsmasq": 15402, "unbound": 15403}
UPSTREAM = 15404
NAMES = 100
tmp = tempfile.mkdtemp(prefix="meshgate-dnsbench-")


def write(name, text):
    return write_file(tmp, name, text)


def addr(i):
    return f"10.50.{i // 250}.{i % 250 + 1}"


def dnsperf(port, queries):
    out = subprocess.run(["taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries,
                          "-l", str(SECONDS), "-c", "4", "-Q", "200000", "-q", "200"], capture_output=True, text=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lat = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    return {"qps": qps, "lat_ms": lat, "lost": lost}


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
        results = {n: {"local": [], "forwarded": []} for n in PORTS}
        for rnd in range(ROUNDS):
            for name, port in PORTS.items():
                for kind, qfile in (("local", local), ("forwarded", forwarded)):
                    r = dnsperf(port, qfile)
                    results[name][kind].append(r)
                    print(f"round {rnd + 1} {name:8} {kind:9} {r['qps']:>9.0f} q/s avg {r['lat_ms']:.3f} ms lost {r['lost']}", flush=True)
        report(results)
    finally:
        stop_all(list(procs.values()) + [upstream])
        shutil.rmtree(tmp, ignore_errors=True)


def report(results):
    med = lambda runs, k: statistics.median(r[k] for r in runs)
    lines = ["## DNS: mesh-dns vs dnsmasq vs unbound", "",
             f"Made by `bench/dns.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}) on {time.strftime('%Y-%m-%d')}. "
             f"Medians of {ROUNDS} interleaved rounds. Each server: one thread on CPU 0, logging off. "
             f"`dnsperf -c 4 -q 200 -l {SECONDS}` on CPU 1 over {NAMES} names: local A records, and forwarded names "
             "answered from each server's warm cache (upstream: a dnsmasq on CPU 1).", "",
             "| server | names | queries/s | vs dnsmasq | vs unbound | avg latency ms | lost |", "|---|---|---|---|---|---|---|"]
    for kind in ("local", "forwarded"):
        base_d, base_u = med(results["dnsmasq"][kind], "qps"), med(results["unbound"][kind], "qps")
        for name in results:
            runs = results[name][kind]
            q = med(runs, "qps")
            lines.append(f"| {name} | {kind} | {q:.0f} | {q / base_d:.2f} | {q / base_u:.2f} | {med(runs, 'lat_ms'):.3f} | {sum(r['lost'] for r in runs)} |")
    replace_section("## DNS:", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
