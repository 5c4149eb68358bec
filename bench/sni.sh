#!/usr/bin/env bash
# Full TLS handshakes per second with 1 and with 1,000 certificates loaded: meshgate vs nginx
# vs HAProxy (the SNI lookup must not slow down as certificates grow). Installs what it
# needs (Debian packages, as root), builds meshgate in release mode, writes bench/RESULTS.md.
# Knobs: ROUNDS (3), SECONDS_PER_RUN (10).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v openssl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends wrk nginx-light haproxy openssl curl >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/sni.py "$@"
