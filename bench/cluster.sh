#!/usr/bin/env bash
# Cluster benchmark on the three-engine lab (tests/lab/swarm-lab.sh: 1 manager + 2 workers):
# the agent deployed with helm-free-deploy/stack.yml on every node; the time from
# `docker service create` to the first 200 through each node; requests/s through a node for a
# task on the same node and on another node (one hop through that node's agent); each
# agent's RSS and CPU at idle and under load. Writes bench/RESULTS.md.
# Knobs: SAMPLES (5), LOAD_SECONDS (10). Run as root; the lab is torn down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /bin/busybox ] || need+=(busybox-static)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release -p meshgate --locked
trap 'tests/lab/swarm-lab.sh down' EXIT
tests/lab/swarm-lab.sh up
python3 bench/cluster.py "$@"
