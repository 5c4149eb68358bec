"""Docker discovery benchmark; see discovery.sh."""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from benchlib import ROOT, replace_section

SAMPLES = int(os.environ.get("SAMPLES", "20"))
BURST = int(os.environ.get("BURST", "100"))
IMAGE = "meshgate-test/busybox:local"
HTTP, ADMIN = "127.0.0.1:18091", "127.0.0.1:19092"
PREFIX = f"mgbench-{os.getpid()}"
TICKS = os.sysconf("SC_CLK_TCK")


def sh(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout.strip()


def image():
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    root = tempfile.mkdtemp()
    os.makedirs(f"{root}/bin")
    shutil.copy("/bin/busybox", f"{root}/bin/busybox")
    for applet in ["sh", "httpd", "hostname", "mkdir"]:
        os.symlink("busybox", f"{root}/bin/{applet}")
    subprocess.run(f"tar -C {root} -c . | docker import - {IMAGE}", shell=True, check=True, capture_output=True)
    shutil.rmtree(root)


def get(host):
    try:
        req = urllib.request.Request(f"http://{HTTP}/", headers={"Host": host})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0


def run_container(name, host):
    script = "mkdir -p /w && hostname > /w/index.html && exec httpd -f -p 80 -h /w"
    sh("docker", "run", "-d", "--name", name, "-e", f"VIRTUAL_HOST={host}", IMAGE, "sh", "-c", script)


def metric(name):
    try:
        text = urllib.request.urlopen(f"http://{ADMIN}/metrics").read().decode()
    except urllib.error.URLError:
        return 0.0  # not listening yet
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def proc_stat(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    return cpu, rss


def main():
    image()
    agent = subprocess.Popen([os.path.join(ROOT, "target/release/meshgate"), "--http-listen", HTTP, "--admin-listen", ADMIN,
                              "--docker-mode", "on", "--log-level", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = []
    try:
        deadline = time.time() + 20
        while time.time() < deadline and metric('meshgate_provider_up{provider="docker"}') != 1.0:
            time.sleep(0.05)
        latencies = []
        for i in range(SAMPLES):
            name, host = f"{PREFIX}-s{i}", f"s{i}.bench.test"
            run_container(name, host)
            names.append(name)
            t0 = time.monotonic()
            while get(host) != 200:
                if time.monotonic() - t0 > 30:
                    sys.exit(f"{host} not served within 30s")
                time.sleep(0.005)
            latencies.append(time.monotonic() - t0)
        reloads_before = metric('meshgate_provider_reloads_total{provider="docker"}')
        cpu_before, _ = proc_stat(agent.pid)
        t0 = time.monotonic()
        burst = [(f"{PREFIX}-b{i}", f"b{i}.bench.test") for i in range(BURST)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda nh: run_container(*nh), burst))
        names += [n for n, _ in burst]
        started = time.monotonic() - t0
        while any(get(h) != 200 for _, h in burst[-5:]) or any(get(h) != 200 for _, h in burst[:5]):
            time.sleep(0.05)
        all_served = time.monotonic() - t0
        assert all(get(h) == 200 for _, h in burst), "every burst container is served"
        cpu_after, rss = proc_stat(agent.pid)
        snapshots = metric('meshgate_provider_reloads_total{provider="docker"}') - reloads_before
        lat = sorted(latencies)
        section = f"""## Docker discovery: from `docker run` to the first request served

Made by `bench/discovery.sh` (SAMPLES={SAMPLES}, BURST={BURST}) on {time.strftime('%Y-%m-%d')}: the release
agent follows the local engine (`--docker-mode on`, debounce 100 ms); each sample starts one
busybox httpd container with `VIRTUAL_HOST` and polls through meshgate every 5 ms until it
answers 200, timed from `docker run -d` returning.

| measure | value |
|---|---|
| `docker run` returned to first 200, median | {statistics.median(lat) * 1000:.0f} ms |
| same, 90th percentile | {lat[int(len(lat) * 0.9) - 1] * 1000:.0f} ms |
| same, worst | {lat[-1] * 1000:.0f} ms |
| burst: {BURST} containers started by 8 parallel `docker run` | {started:.1f} s |
| burst: all {BURST} served after the first start | {all_served:.1f} s |
| snapshots published during the burst | {snapshots:.0f} (one per debounce window, not one per container) |
| agent CPU during the burst | {cpu_after - cpu_before:.2f} s |
| agent RSS with {SAMPLES + BURST} routed containers | {rss / 1024:.1f} MiB |
"""
        replace_section("## Docker discovery:", section)
    finally:
        agent.terminate()
        for chunk in range(0, len(names), 50):
            subprocess.run(["docker", "rm", "-f", *names[chunk:chunk + 50]], capture_output=True)


if __name__ == "__main__":
    main()
