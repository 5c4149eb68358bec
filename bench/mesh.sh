#!/usr/bin/env bash
# Side-by-side L4 benchmark in network namespaces: one published port served by the meshgate
# XDP path, by iptables DNAT rules doing the same mapping, and by HAProxy in TCP mode, in one
# run; plus nanoseconds per packet of the XDP program alone (BPF_PROG_TEST_RUN). Installs what
# it needs (Debian packages, as root), builds in release mode, writes bench/RESULTS.md.
# Knobs: ROUNDS (3), SECONDS_PER_RUN (10).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
for tool in wrk nginx haproxy iptables dnsperf dnsmasq ethtool clang-19; do
  command -v "$tool" >/dev/null || { apt-get update -qq; apt-get install -y -qq --no-install-recommends wrk nginx-light haproxy iptables dnsperf dnsmasq-base ethtool clang-19 libbpf-dev bpftool iproute2 >/dev/null; break; }
done
cargo build --release -p meshgate --locked
cargo build --release -p meshgate-ebpf --example ns_per_packet --locked
exec python3 bench/mesh.py "$@"
