#!/usr/bin/env bash
# The fuzz tests with many inputs (FUZZ_INPUTS, a million by default; CI tries 1,000 each):
# the Traefik rule parser, labels and variables, the routes file, the cluster feed's frames
# (proxy), DNS messages (mesh-dns over the wire, in tests/integration/dns.rs), and random
# packets through the XDP program (BPF_PROG_TEST_RUN, as root). A failure names its input
# number; the input is made again from it (seeded), and becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_INPUTS="${FUZZ_INPUTS:-1000000}"
cargo test --release -p meshgate --lib fuzzed
cargo test --release -p meshgate-ebpf fuzzed
