"""Helpers shared by the benchmark scripts: pinned processes and RESULTS.md sections."""

import os
import signal
import subprocess

TICKS = os.sysconf("SC_CLK_TCK")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


def require_free(ports):
    """Exits unless every TCP port is free on loopback: a server left from another run on a
    port would be measured in place of the one meant (it happened: an nginx answered as
    meshgate)."""
    import socket
    for port in ports:
        with socket.socket() as s:
            # As servers bind: connections in TIME_WAIT from an earlier run do not count,
            # a listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"port {port} is in use: stop what holds it (ss -ltnp 'sport = :{port}') and run again")


def start(cmd, cpu, env=None):
    """Starts `cmd` pinned to `cpu` in its own process group (stop it with os.killpg).
    meshgate's access log is off (as nginx's in these configs) unless `env` turns it on."""
    env = {**os.environ, "MESHGATE_LOG_ACCESS": "off", **(env or {})}
    return subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def stop_all(procs):
    """Stops every process group started with `start` (already gone is fine) and waits
    until each has exited (its ports are free again: meshgate says "not ready" for
    proxy.shutdown_delay before it closes), killing what is still there after 10 s."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def write_file(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def replace_section(heading, section):
    """Puts `section` (starting with `heading`) into RESULTS.md in place of the old one, which
    is kept below it as an earlier run (with the earlier runs it kept): a rerun never loses
    the figures it is compared with."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\nEach section names the command that made it.\n"
    start_at = text.find(heading)
    if start_at >= 0:
        end = text.find("\n## ", start_at + 1)
        old = text[start_at:end + 1] if end >= 0 else text[start_at:]
        earlier = old.split("\n", 1)[1].strip("\n") if "\n" in old else ""
        if earlier:
            section = section.rstrip("\n") + "\n\n### Earlier run (kept for comparison)\n\n" + earlier + "\n"
        text = text[:start_at] + section.rstrip("\n") + "\n\n" + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text)
    print(section)


def nginx_conf(tmp, body, workers=1):
    """An nginx config with `workers` workers, logging off and temp paths in `tmp`, around `body`."""
    return f"""daemon off; worker_processes {workers}; pid {tmp}/nginx-{abs(hash(body))}.pid; error_log stderr crit;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {tmp}; proxy_temp_path {tmp};
fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp}; {body} }}"""


def group_pids(proc):
    out = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(proc):
    """User + system CPU time of a process group started with `start`."""
    total = 0
    for pid in group_pids(proc):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / TICKS


def cpu_model():
    """The processor's model name, for a section's heading (machines of one kind differ)."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def core_busy_seconds(cpu):
    """Seconds CPU `cpu` has spent busy (user, system, interrupts) since boot, from /proc/stat:
    what a server pinned alone to that core costs, its packets' kernel work included."""
    for line in open("/proc/stat"):
        if line.startswith(f"cpu{cpu} "):
            f = [int(x) for x in line.split()[1:]]
            idle = f[3] + f[4]
            return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def rss_kib(proc, field):
    total = 0
    for pid in group_pids(proc):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def ms(value, unit):
    """A latency as wrk or h2load print it, in milliseconds."""
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def haproxy_conf(bind, backend_port, global_extra="", threads=1):
    """An HAProxy config with `threads` threads, logging off and upstream keep-alive: `bind`
    (the frontend's bind line after `bind `; more lines may follow) to one backend server on
    loopback."""
    return f"""global
  nbthread {threads}
  maxconn 8192
{global_extra}defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option forwardfor
  http-reuse always
frontend fe
  bind {bind}
  default_backend be
backend be
  server s1 127.0.0.1:{backend_port}
"""


def http_status(url, host):
    """The status of GET `url` with `Host: host`; 0 when nothing answers."""
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0


def wait(what, check, limit=120):
    """Polls `check` until true; the seconds it took. Exits with `what` after `limit`."""
    import time
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > limit:
            raise SystemExit(f"{what}: not within {limit}s")
        time.sleep(0.01)
    return time.monotonic() - t0
