"""Helpers shared by the benchmark scripts: pinned processes and RESULTS.md sections."""

import os
import signal
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


def start(cmd, cpu, env=None):
    """Starts `cmd` pinned to `cpu` in its own process group (stop it with os.killpg)."""
    return subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})


def stop_all(procs):
    """Stops every process group started with `start` (already gone is fine)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def write_file(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def replace_section(heading, section):
    """Puts `section` (starting with `heading`) into RESULTS.md, replacing the old one."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\nEach section names the command that made it.\n"
    start_at = text.find(heading)
    if start_at >= 0:
        end = text.find("\n## ", start_at + 1)
        text = text[:start_at] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text)
    print(section)
