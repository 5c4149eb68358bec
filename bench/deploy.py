"""Swarm deploy benchmark; see deploy.sh."""

import os
import statistics
import subprocess
import tempfile
import time

from benchlib import ROOT, http_status, replace_section, wait
from discovery import IMAGE, image, proc_stat, sh

SAMPLES = int(os.environ.get("SAMPLES", "5"))
LOAD_SECONDS = int(os.environ.get("LOAD_SECONDS", "10"))
PORTS = {"MESHGATE_HTTP_PORT": "18190", "MESHGATE_HTTPS_PORT": "18543", "MESHGATE_ADMIN_PORT": "19190", "MESHGATE_CLUSTER_PORT": "17490"}
TAG = "meshgate-bench/agent:local"
STACK, SECRET, NET = "mgbench", "mgbench-cluster", "mgbench-net"
HTTP = f"127.0.0.1:{PORTS['MESHGATE_HTTP_PORT']}"


def status(host):
    return http_status(f"http://{HTTP}/", host)


def agent_pid():
    cid = sh("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_agent")
    return int(sh("docker", "inspect", "-f", "{{.State.Pid}}", cid.split()[0]))


def cost(pid, seconds, during=None):
    cpu0, _ = proc_stat(pid)
    t0 = time.monotonic()
    result = during() if during else time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu1, rss = proc_stat(pid)
    return (cpu1 - cpu0) / elapsed, rss, result


def main():
    image()
    subprocess.run(["bash", "helm-free-deploy/build-image.sh", os.path.join(ROOT, "target/release/meshgate"), TAG], check=True, capture_output=True)
    created = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}") != "active"
    if created:
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
    demo_file = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
    try:
        subprocess.run(f"docker run --rm {TAG} --new-cluster-secret | docker secret create {SECRET} -", shell=True, check=True, capture_output=True)
        sh("docker", "network", "create", "--driver", "bridge", "--scope", "swarm", NET)
        env = dict(os.environ, MESHGATE_IMAGE=TAG, MESHGATE_CLUSTER_SECRET=SECRET, **PORTS)
        t0 = time.monotonic()
        subprocess.run(["docker", "stack", "deploy", "--detach=true", "-c", "helm-free-deploy/stack.yml", STACK], env=env, check=True, capture_output=True)
        wait("the agent is healthy", lambda: "(healthy)" in sh("docker", "ps", "--filter", f"label=com.docker.swarm.service.name={STACK}_agent", "--format", "{{.Status}}"))
        agent_ready = time.monotonic() - t0
        pid = agent_pid()
        script = "mkdir -p /w && hostname > /w/index.html && exec httpd -f -p 80 -h /w"
        samples = []
        for i in range(SAMPLES):
            host = f"d{i}.bench.test"
            demo_file.seek(0)
            demo_file.truncate()
            demo_file.write(f"""version: "3.8"
services:
  web:
    image: {IMAGE}
    command: ["sh", "-c", "{script}"]
    environment:
      VIRTUAL_HOST: {host}
    networks: [net]
networks:
  net:
    external: true
    name: {NET}
""")
            demo_file.flush()
            t0 = time.monotonic()
            subprocess.run(["docker", "stack", "deploy", "--detach=true", "-c", demo_file.name, f"{STACK}d{i}"], check=True, capture_output=True)
            wait(f"{host} served", lambda: status(host) == 200)
            samples.append(time.monotonic() - t0)
        # The agent on CPU 0, the load generator on CPU 1.
        sh("docker", "update", "--cpuset-cpus", "0", sh("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_agent").split()[0])
        idle_cpu, idle_rss, _ = cost(pid, LOAD_SECONDS)
        wrk = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{LOAD_SECONDS}s", "-H", "Host: d0.bench.test", f"http://{HTTP}/"]
        load_cpu, load_rss, out = cost(pid, LOAD_SECONDS, lambda: subprocess.run(wrk, capture_output=True, text=True, check=True).stdout)
        rate = next(l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec"))
        lat = sorted(samples)
        section = f"""## Swarm deploy: from `docker stack deploy` to the first request through meshgate

Made by `bench/deploy.sh` (SAMPLES={SAMPLES}, LOAD_SECONDS={LOAD_SECONDS}) on {time.strftime('%Y-%m-%d')}: the release
agent's image (`build-image.sh`) deployed with `helm-free-deploy/stack.yml` on a one-node
Swarm; each sample deploys a one-service demo stack (busybox httpd with `VIRTUAL_HOST`) and
polls through meshgate on the node every 20 ms, timed from the start of `docker stack deploy`.
Idle and load figures are the agent container's process (`/proc`), the load from `wrk -t1
-c16` pinned to CPU 1 on the demo's route, the agent's container pinned to CPU 0
(`docker update --cpuset-cpus 0`). The rate under load is bounded by the demo backend
(busybox httpd forks a process per request), not by meshgate: this measures what the
deployed agent costs, `bench/proxy.sh` measures the proxy against nginx and HAProxy.

| measure | value |
|---|---|
| meshgate's own `docker stack deploy` to agent healthy | {agent_ready:.1f} s |
| demo `docker stack deploy` to first 200 through meshgate, median | {statistics.median(lat) * 1000:.0f} ms |
| same, worst of {SAMPLES} | {lat[-1] * 1000:.0f} ms |
| agent CPU at idle ({SAMPLES} demo services routed) | {idle_cpu * 100:.2f} % of one core |
| agent RSS at idle | {idle_rss / 1024:.1f} MiB |
| agent CPU under load ({rate} requests/s) | {load_cpu * 100:.0f} % of one core |
| agent RSS under load | {load_rss / 1024:.1f} MiB |
"""
        replace_section("## Swarm deploy:", section)
        print(section)
    finally:
        for i in range(SAMPLES):
            subprocess.run(["docker", "stack", "rm", f"{STACK}d{i}"], capture_output=True)
        subprocess.run(["docker", "stack", "rm", STACK], capture_output=True)
        for _ in range(100):
            if subprocess.run(["docker", "network", "rm", NET], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        for _ in range(100):
            if subprocess.run(["docker", "secret", "rm", SECRET], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        for _ in range(100):
            if subprocess.run(["docker", "volume", "rm", f"{STACK}_certs"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        if created:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True)
        os.unlink(demo_file.name)


if __name__ == "__main__":
    main()
