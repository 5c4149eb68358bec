#!/usr/bin/env bash
# Route table size: meshgate (and BASELINE=an older meshgate binary) vs nginx with 1, 1,000
# 10,000 and 100,000 services (ROUTE_COUNTS), exact and wildcard hosts, then host regexes
# (REGEX_COUNTS); ROUNDS interleaved rounds. Installs what it needs
# (Debian packages, as root), builds meshgate in release mode, writes bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends wrk nginx-light >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/routes.py "$@"
