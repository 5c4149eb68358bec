"""Runs the L4 benchmark; see mesh.sh. Writes the L4 section of bench/RESULTS.md.

Topology: a client namespace and a node namespace joined by a veth pair (the node's uplink),
the node's task bridge with one task namespace running nginx (`return 200 'ok'`) and dnsmasq.
The same task is published three ways on the node, side by side:
  8080/tcp, 5353/udp: meshgate's XDP path (the agent binary, --mesh-uplink);
  8081/tcp, 5354/udp: iptables DNAT rules in the node's PREROUTING chain;
  8082/tcp:          HAProxy in TCP mode (one thread), which also carries the replies.
Kernel work happens in softirq on whichever CPU sends, so pinning cannot isolate it the way
it isolates a user-space proxy: the load generator is pinned to CPU 1, the task's servers and
HAProxy to CPU 0, and the numbers compare whole-system throughput at the same load.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import benchlib
from benchlib import ROOT, haproxy_conf, nginx_conf, replace_section, write_file

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
PID = os.getpid()
CLIENT, NODE, TASK = f"mgbc{PID}", f"mgbn{PID}", f"mgbt{PID}"
NODE_IP, CLIENT_IP, TASK_IP = "192.0.2.10", "192.0.2.1", "10.0.9.2"
PATHS = {"meshgate XDP": (8080, 5353), "iptables DNAT": (8081, 5354), "HAProxy TCP": (8082, None)}

tmp = tempfile.mkdtemp(prefix="meshgate-bench-l4-")
procs = []


def sh(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def spawn(*args, ns, cpu):
    p = subprocess.Popen(["ip", "netns", "exec", ns, "taskset", "-c", cpu] + list(args), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    return p


def topology():
    for ns in (CLIENT, NODE, TASK):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "c0", "netns", CLIENT, "type", "veth", "peer", "name", "u0", "netns", NODE)
    sh("ip", "-n", CLIENT, "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
    sh("ip", "-n", CLIENT, "link", "set", "c0", "up")
    sh("ethtool", "-K", "c0", "tx", "off", ns=CLIENT)  # full checksums, as from a NIC
    sh("ip", "-n", NODE, "addr", "add", f"{NODE_IP}/24", "dev", "u0")
    sh("ip", "-n", NODE, "link", "set", "u0", "up")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=NODE)
    sh("ip", "-n", NODE, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", NODE, "addr", "add", "10.0.9.1/24", "dev", "br0")
    sh("ip", "-n", NODE, "link", "set", "br0", "up")
    sh("ip", "link", "add", "e0", "netns", TASK, "type", "veth", "peer", "name", "v2", "netns", NODE)
    sh("ip", "-n", NODE, "link", "set", "v2", "master", "br0", "up")
    sh("ip", "-n", TASK, "addr", "add", f"{TASK_IP}/24", "dev", "e0")
    sh("ip", "-n", TASK, "link", "set", "e0", "up")
    sh("ip", "-n", TASK, "route", "add", "default", "via", "10.0.9.1")


def servers():
    backend = nginx_conf(tmp, f"server {{ listen {TASK_IP}:80 backlog=4096; location / {{ return 200 'ok'; }} }}")
    spawn("nginx", "-c", write_file(tmp, "backend.conf", backend), ns=TASK, cpu="0")
    spawn("dnsmasq", "-k", "-p", "53", "--listen-address", TASK_IP, "--bind-interfaces", "--no-resolv", "--no-hosts",
          "--address=/bench.test/192.0.2.99", "--cache-size=0", ns=TASK, cpu="0")
    for proto, published, target in (("tcp", 8081, 80), ("udp", 5354, 53)):
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-p", proto, "-d", NODE_IP, "--dport", str(published),
           "-j", "DNAT", "--to-destination", f"{TASK_IP}:{target}", ns=NODE)
    ha = haproxy_conf(f"{NODE_IP}:8082", 80).replace("mode http", "mode tcp").replace("  option forwardfor\n  http-reuse always\n", "")
    ha = ha.replace(f"server s1 127.0.0.1:80", f"server s1 {TASK_IP}:80")
    spawn("haproxy", "-f", write_file(tmp, "haproxy.cfg", ha), ns=NODE, cpu="0")
    routes = ("[[services]]\nname = \"bench\"\n"
              f"tasks = [{{ address = \"{TASK_IP}\", node = \"n1\" }}]\n"
              "[[services.l4]]\nprotocol = \"tcp\"\npublished = 8080\ntarget = 80\n"
              "[[services.l4]]\nprotocol = \"udp\"\npublished = 5353\ntarget = 53\n")
    exe = os.path.join(ROOT, "target", "release", "meshgate")
    spawn(exe, "--docker-mode", "off", "--routes-file", write_file(tmp, "routes.toml", routes), "--http-listen", "127.0.0.1:0",
          "--admin-listen", "127.0.0.1:0", "--log-level", "warn", "--mesh-uplink", "u0", "--mesh-node-address", NODE_IP,
          "--mesh-node-name", "n1", ns=NODE, cpu="0")
    deadline = time.time() + 20
    while time.time() < deadline:
        if all(sh("curl", "-s", "--max-time", "1", f"http://{NODE_IP}:{tcp}/", ns=CLIENT, check=False) == "ok" for tcp, _ in PATHS.values()):
            return
        time.sleep(0.2)
    raise SystemExit("the three published ports did not all answer 'ok'")


def ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port, close):
    """One wrk run; None (after printing wrk's own output) when it fails or made no request."""
    extra = ["-H", "Connection: close"] if close else []
    cmd = ["ip", "netns", "exec", CLIENT, "taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{SECONDS}s", "--latency", *extra,
           f"http://{NODE_IP}:{port}/"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    out = run.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if run.returncode or not found or float(found.group(1)) == 0:
        print(f"wrk failed on port {port} (exit {run.returncode}):\n{out}{run.stderr}", flush=True)
        return None
    rps = float(found.group(1))
    p99 = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}["99"]
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99": p99, "errors": errors.group(1) if errors else ""}


def dnsperf(port):
    queries = write_file(tmp, "queries.txt", "bench.test A\n" * 100)
    out = sh("taskset", "-c", "1", "dnsperf", "-s", NODE_IP, "-p", str(port), "-d", queries, "-l", str(SECONDS), "-c", "8", "-q", "256", ns=CLIENT)
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", out).group(1)
    return {"qps": qps, "lost": int(lost)}


PROGRAMS = ("meshgate_xdp", "meshgate_tc_in", "meshgate_tc_reply")


def bpf_run_stats():
    """Run time and run count of meshgate's programs, from the kernel's own statistics
    (kernel.bpf_stats_enabled): {name: (ns, runs)}."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True).stdout)
    stats = {name: (0, 0) for name in PROGRAMS}
    for prog in progs:
        if prog.get("name") in stats:
            ns, runs = stats[prog["name"]]
            stats[prog["name"]] = (ns + prog.get("run_time_ns", 0), runs + prog.get("run_cnt", 0))
    return stats


def per_run(before, after):
    """Nanoseconds per run of each program between two bpf_run_stats."""
    return {name: (after[name][0] - before[name][0]) / max(1, after[name][1] - before[name][1]) for name in PROGRAMS}


def ns_per_packet():
    exe = os.path.join(ROOT, "target", "release", "examples", "ns_per_packet")
    return subprocess.run(["taskset", "-c", "0", exe, "50000"], check=True, capture_output=True, text=True).stdout.strip()


def main():
    try:
        topology()
        servers()
        results = {name: {"keepalive": [], "close": [], "udp": []} for name in PATHS}
        live = {name: [] for name in PROGRAMS}
        stats_were = sh("sysctl", "-n", "kernel.bpf_stats_enabled").strip()
        sh("sysctl", "-qw", "kernel.bpf_stats_enabled=1")
        try:
            for rnd in range(ROUNDS):
                for name, (tcp, udp) in PATHS.items():
                    before = bpf_run_stats()
                    k = wrk(tcp, False)
                    if name == "meshgate XDP":
                        for prog, ns in per_run(before, bpf_run_stats()).items():
                            live[prog].append(ns)
                    c = wrk(tcp, True)
                    results[name]["keepalive"].append(k)
                    results[name]["close"].append(c)
                    show = lambda r, unit: f"{r['rps']:>8.0f} {unit}" if r else "  FAILED"
                    line = f"round {rnd + 1} {name:14} keep-alive {show(k, 'req/s')}  new connections {show(c, '/s')}"
                    if udp:
                        u = dnsperf(udp)
                        results[name]["udp"].append(u)
                        line += f"  UDP {u['qps']:>8.0f} q/s (lost {u['lost']})"
                    print(line, flush=True)
        finally:
            sh("sysctl", "-qw", f"kernel.bpf_stats_enabled={stats_were}")
        per_packet = ns_per_packet()
        print(per_packet)
        print("live ns per run (keep-alive legs):", {p: [round(v, 1) for v in vs] for p, vs in live.items()})
        report(results, per_packet, live)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        for ns in (CLIENT, NODE, TASK):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def med(runs, key):
    """The median over the rounds that completed (0 when none did)."""
    done = [r[key] for r in runs if r]
    return statistics.median(done) if done else 0


def spread(runs, key):
    """min-max over the rounds, and how many failed."""
    done = [r[key] for r in runs if r]
    text = f"{min(done):.0f}-{max(done):.0f}" if done else "-"
    failed = len(runs) - len(done)
    return text + (f", {failed} failed" if failed else "")


def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"


def report(results, per_packet, live):
    cpu = benchlib.cpu_model()
    kernel = os.uname().release
    base = results["iptables DNAT"]
    lines = [
        "## L4: meshgate XDP vs iptables DNAT vs HAProxy TCP",
        "",
        f"Made by `bench/mesh.sh` (ROUNDS={ROUNDS}, SECONDS_PER_RUN={SECONDS}) on {time.strftime('%Y-%m-%d')}, 2 cores ({cpu}), kernel {kernel}. "
        f"Medians of {ROUNDS} interleaved rounds, the spread (min-max) below each. Client and node namespaces on a veth pair, one task behind the node's bridge "
        "(nginx `return 200 'ok'`, dnsmasq), the same task published three ways side by side, one client address, no pause between legs. "
        "Load: `wrk -t1 -c64` (keep-alive, and `Connection: close` for new connections), `dnsperf -c8 -q256` for UDP, pinned to CPU 1; "
        "task servers and HAProxy on CPU 0.",
        "",
        "| path | new connections/s | vs iptables | keep-alive req/s | vs iptables | p99 ms (keep-alive) | UDP queries/s | vs iptables |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        udp = f"{med(r['udp'], 'qps'):.0f} | {ratio(med(r['udp'], 'qps'), med(base['udp'], 'qps'))}" if r["udp"] else "- | -"
        lines.append(f"| {name} | {med(r['close'], 'rps'):.0f} | {ratio(med(r['close'], 'rps'), med(base['close'], 'rps'))} | "
                     f"{med(r['keepalive'], 'rps'):.0f} | {ratio(med(r['keepalive'], 'rps'), med(base['keepalive'], 'rps'))} | "
                     f"{med(r['keepalive'], 'p99'):.2f} | {udp} |")
        udp_spread = f"{spread(r['udp'], 'qps')} | " if r["udp"] else "- | "
        lines.append(f"| *spread* | *{spread(r['close'], 'rps')}* | | *{spread(r['keepalive'], 'rps')}* | | | *{udp_spread.rstrip(' |')}* | |")
    programs = ", ".join(f"`{p}` {statistics.median(v):.1f} ns ({min(v):.1f}-{max(v):.1f})" for p, v in live.items() if v)
    lines += ["", f"Per packet under live traffic (the kernel's own run-time statistics, `kernel.bpf_stats_enabled`: run time over run "
                  f"count during each meshgate keep-alive leg, median and spread over the rounds): {programs}.",
              "", f"XDP program alone (`ns_per_packet`, BPF_PROG_TEST_RUN): `{per_packet}`."]
    replace_section("## L4:", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
