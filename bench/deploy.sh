#!/usr/bin/env bash
# Swarm deploy benchmark: the agent deployed with helm-free-deploy/stack.yml on a one-node
# Swarm (created here and left again if there was none), then the time from `docker stack
# deploy` of a demo service to its first request served through meshgate on the node, and
# the agent's CPU and RSS at idle and under load. Writes bench/RESULTS.md.
# Knobs: SAMPLES (5), LOAD_SECONDS (10).
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
exec python3 bench/deploy.py "$@"
