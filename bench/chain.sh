#!/usr/bin/env bash
# What a middleware chain costs: one route with headers + basic auth + a rate limit (set far
# above the offered load) among 1,000 routes, beside a plain route, in meshgate and in nginx
# doing the same (add_header, auth_basic, limit_req); apr1 and bcrypt users. Installs what
# it needs (Debian packages, as root), builds meshgate in release mode, writes
# bench/RESULTS.md. Knobs: ROUNDS (3), SECONDS_PER_RUN (10), CONNS (64).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v htpasswd >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends wrk nginx-light apache2-utils >/dev/null
fi
cargo build --release -p meshgate --locked
exec python3 bench/chain.py "$@"
