#!/usr/bin/env bash
# Installs what the tests need (Debian packages, as root) and runs every test:
# formatting (cargo fmt --check), lints (clippy, warnings are errors), unit tests and the
# integration tests against real sockets, real backends, curl and the agent binary.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "tests/run-all.sh installs Debian packages: run it as root (e.g. sudo tests/run-all.sh)" >&2
  exit 1
fi

echo "==> installing test dependencies (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl ca-certificates openssl procps busybox-static dnsutils dnsmasq-base pebble clang-19 libbpf-dev bpftool iproute2 ethtool iptables binutils prometheus haproxy apache2-utils chromium knot >/dev/null

if ! docker info >/dev/null 2>&1; then
  echo "the Docker discovery tests need a running Docker engine (docker info failed)" >&2
  exit 1
fi

echo "==> formatting (cargo fmt --check; rustfmt.toml holds the stable options)"
cargo fmt --all --check

echo "==> clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
