#!/usr/bin/env bash
# DNS benchmark: mesh-dns vs dnsmasq vs unbound with dnsperf, local names and forwarded
# names with a warm cache, interleaved rounds. Installs what it needs (as root), builds
# meshgate in release mode, writes bench/RESULTS.md. Knobs: ROUNDS (3), SECONDS_PER_RUN (10).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dnsperf >/dev/null || ! command -v unbound >/dev/null || ! command -v dnsmasq >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsperf unbound dnsmasq-base >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/dns.py "$@"
