#!/usr/bin/env python3
"""Connection storm: the agent's RSS before, during and after N idle keep-alive connections
(each sent one request, answered 200 by the bundled example's whoami), in rounds. Usage:
bench/storm.py BINARY [N] [ROUNDS]; prints one line per stage. Needs a hard `ulimit -n` above
N (the soft limit is raised to it here)."""
import os, resource, socket, subprocess, sys, tempfile, time

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, admin, whoami = free_port(), free_port(), free_port()
env = dict(os.environ, DOCKER_HOST="unix:///nonexistent")
agent = subprocess.Popen([binary, "--example", "--http-listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                          "--whoami-listen", f"127.0.0.1:{whoami}", "--log-level", "warn", "--max-connections", str(n + 100),
                          "--max-connections-per-client", str(n + 100)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
        except OSError:
            time.sleep(0.05)
    req = b"GET / HTTP/1.1\r\nHost: whoami.localhost\r\n\r\n"
    print(f"idle: {rss_mib(agent.pid):.1f} MiB")
    for r in range(rounds):
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port)); s.sendall(req); socks.append(s)
        for s in socks:
            status = s.recv(4096).split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                sys.exit(f"a connection was answered {status!r}, not 200: not the storm this measures")
        time.sleep(1)
        print(f"round {r + 1}: {n} connections open: {rss_mib(agent.pid):.1f} MiB")
        for s in socks:
            s.close()
        time.sleep(3)
        print(f"round {r + 1}: after they closed: {rss_mib(agent.pid):.1f} MiB")
finally:
    agent.terminate(); agent.wait()
