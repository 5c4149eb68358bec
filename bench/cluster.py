"""Cluster benchmark on the lab; see cluster.sh."""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import ROOT, http_status, replace_section, wait
from discovery import proc_stat

SAMPLES = int(os.environ.get("SAMPLES", "5"))
LOAD_SECONDS = int(os.environ.get("LOAD_SECONDS", "10"))
IMAGE = "meshgate-test/busybox:local"
NODES = (1, 2, 3)
HTTPD = "mkdir -p /w && hostname > /w/index.html && exec httpd -f -p 80 -h /w"


def addr(i):
    return f"198.18.50.1{i}"


def dk(i, *args, check=True):
    out = subprocess.run(["docker", "-H", f"unix:///var/lib/mglab/n{i}/docker.sock", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"docker (node {i}) {' '.join(args)}: {out.stderr}")
    return out.stdout.strip()


def status(i, host):
    return http_status(f"http://{addr(i)}/", host)


def images():
    root = tempfile.mkdtemp()
    os.makedirs(f"{root}/bin")
    subprocess.run(["cp", "/bin/busybox", f"{root}/bin/busybox"], check=True)
    for applet in ("sh", "httpd", "hostname", "mkdir"):
        os.symlink("busybox", f"{root}/bin/{applet}")
    binary = os.path.join(ROOT, "target/release/meshgate")
    for i in NODES:
        sock = f"unix:///var/lib/mglab/n{i}/docker.sock"
        subprocess.run(f"tar -C {root} -c . | docker -H {sock} import - {IMAGE}", shell=True, check=True, capture_output=True)
        subprocess.run(["bash", "helm-free-deploy/build-image.sh", binary], env=dict(os.environ, DOCKER_HOST=sock), check=True, capture_output=True)


def agent_pid(i):
    cid = dk(i, "ps", "-q", "--filter", "label=com.docker.swarm.service.name=meshgate_agent").split()[0]
    return int(dk(i, "inspect", "-f", "{{.State.Pid}}", cid))


def first_200_per_node(host):
    """Seconds from the create call to the first 200 through each node."""
    found = {}
    t0 = time.monotonic()

    def poll(i):
        while status(i, host) != 200:
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"{host} never answered through node {i}")
            time.sleep(0.01)
        found[i] = time.monotonic() - t0

    threads = [threading.Thread(target=poll, args=(i,)) for i in NODES]
    for t in threads:
        t.start()
    dk(1, "service", "create", "--detach", "--name", host.split(".")[0], "--stop-grace-period", "1s",
       "--constraint", "node.hostname==mglab-n3", "-e", f"VIRTUAL_HOST={host}", IMAGE, "sh", "-c", HTTPD)
    for t in threads:
        t.join()
    return found


def wrk(i, host):
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{LOAD_SECONDS}s", "-H", f"Host: {host}", f"http://{addr(i)}/"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(errors.group(1)) if errors else 0
    if errors:
        # Why, from every agent's warnings during the load (the lab goes down after the run).
        for n in NODES:
            for cid in dk(n, "ps", "-q", "--filter", "label=com.docker.swarm.service.name=meshgate_agent").split():
                logs = subprocess.run(["docker", "-H", f"unix:///var/lib/mglab/n{n}/docker.sock", "logs", "--since", since, cid],
                                      capture_output=True, text=True)
                for line in (logs.stdout + logs.stderr).splitlines():
                    if '"WARN"' in line or '"ERROR"' in line:
                        print(f"node {n} agent: {line}", file=sys.stderr)
    return rps, errors


def costs(seconds, during=None):
    """Each agent's CPU (cores) and RSS (MiB) over `seconds`, or over `during()`."""
    pids = {i: agent_pid(i) for i in NODES}
    before = {i: proc_stat(pid)[0] for i, pid in pids.items()}
    t0 = time.monotonic()
    result = during() if during else time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = {i: proc_stat(pid) for i, pid in pids.items()}
    return {i: ((after[i][0] - before[i]) / elapsed, after[i][1]) for i in NODES}, result


def main():
    images()
    subprocess.run("target/release/meshgate --new-cluster-secret | "
                   "docker -H unix:///var/lib/mglab/n1/docker.sock secret create meshgate_cluster -", shell=True, check=True, capture_output=True)
    dk(1, "stack", "deploy", "-c", "helm-free-deploy/stack.yml", "meshgate")
    wait("every agent is healthy", lambda: dk(1, "service", "ps", "meshgate_agent", "--format", "{{.CurrentState}}").count("Running") == 3)
    for i in NODES:
        wait(f"node {i}'s agent answers", lambda i=i: status(i, "nothing.test") == 404)

    samples = [first_200_per_node(f"b{n}.bench.test") for n in range(SAMPLES)]
    first = {i: statistics.median(s[i] for s in samples) for i in NODES}
    spread = {i: (min(s[i] for s in samples), max(s[i] for s in samples)) for i in NODES}

    idle, _ = costs(5)
    host = "b0.bench.test"
    local_rps, local_err = wrk(3, host)
    loaded, (remote_rps, remote_err) = costs(None, lambda: wrk(1, host))

    rows = "\n".join(f"| node {i} ({'runs the task' if i == 3 else 'no task'}) | {first[i] * 1000:.0f} ms ({spread[i][0] * 1000:.0f} to {spread[i][1] * 1000:.0f}) |" for i in NODES)
    cost_rows = "\n".join(f"| node {i} | {idle[i][0] * 100:.1f} % | {idle[i][1] / 1024:.1f} MiB | {loaded[i][0] * 100:.1f} % | {loaded[i][1] / 1024:.1f} MiB |" for i in NODES)
    section = f"""## Cluster: three real engines (the lab), the agent on every node

Command: `bash bench/cluster.sh` (SAMPLES={SAMPLES}, LOAD_SECONDS={LOAD_SECONDS}), on the three-engine lab of
`tests/lab/swarm-lab.sh` (1 manager + 2 workers, one dockerd per namespace, on this 2-core machine: every
agent, every engine and the load generator share the two cores, so the figures are for comparing
runs, not absolute). The task is pinned to node 3; `wrk -t1 -c16` from the machine.

From `docker service create` to the first 200 through each node (median of {SAMPLES}, min to max):

| node | first 200 |
|---|---|
{rows}

Requests/s through a node (keep-alive from wrk; the task, busybox `httpd`, closes every connection, so every request
opens an upstream connection: through node 1 that is a new hop, with its TCP and TLS handshakes to node 3's agent):

| through | requests/s | non-2xx |
|---|---|---|
| node 3 (task on the same node) | {local_rps:.0f} | {local_err} |
| node 1 (task on node 3: one hop through node 3's agent, mutual TLS) | {remote_rps:.0f} | {remote_err} |

Agent CPU (of one core) and RSS, idle (5 s) and while node 1 is loaded:

| node | CPU idle | RSS idle | CPU under load | RSS under load |
|---|---|---|---|---|
{cost_rows}
"""
    replace_section("## Cluster: three real engines", section)


if __name__ == "__main__":
    main()
