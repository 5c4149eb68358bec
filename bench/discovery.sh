#!/usr/bin/env bash
# Docker discovery benchmark: time from `docker run` returning to the first request served
# by the new container, and the agent's cost during a burst of starts. Needs a running
# Docker engine and Debian's busybox-static (installed here). Writes bench/RESULTS.md.
# Knobs: SAMPLES (20), BURST (100).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /bin/busybox ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/discovery.py "$@"
