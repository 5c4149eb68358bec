#!/usr/bin/env bash
# Side-by-side TLS benchmark: meshgate vs nginx vs HAProxy with the same certificate (ECDSA
# P-256, then RSA-2048): full handshakes per second, kept-alive HTTPS requests per second, and
# CPU per request at a fixed rate. Installs what it needs (Debian packages, as root), builds
# meshgate in release mode, writes bench/RESULTS.md. Knobs: ROUNDS (3), SECONDS_PER_RUN (10), RATE (4000).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v openssl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends wrk nghttp2-client nginx-light haproxy openssl curl >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/tls.py "$@"
