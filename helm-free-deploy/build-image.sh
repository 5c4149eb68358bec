#!/usr/bin/env bash
# Builds the meshgate image with no registry at all: a root filesystem holding the binary,
# the few shared libraries it links (from this machine) and a CA bundle, imported with
# `docker import`. Usage: helm-free-deploy/build-image.sh [BINARY] [TAG]
#   BINARY defaults to target/release/meshgate (built if missing), TAG to meshgate:local.
set -euo pipefail
binary=$(realpath -m "${1:-$(dirname "$0")/../target/release/meshgate}")
tag=${2:-meshgate:local}
cd "$(dirname "$0")/.."
if [ ! -x "$binary" ]; then
  cargo build --release -p meshgate --locked
fi
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/local/bin/meshgate"
# Debug information stays in the build (for profiling), not in the image.
strip --strip-debug "$root/usr/local/bin/meshgate"
# The dynamic loader and every library `ldd` names, at the same paths.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
  install -D -m 0755 "$lib" "$root$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
mkdir -p "$root/var/lib/meshgate" "$root/tmp"
echo "meshgate:x:0:0:meshgate:/var/lib/meshgate:/usr/local/bin/meshgate" > "$root/etc/passwd"
tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/meshgate"]' \
  --change 'ENV MESHGATE_LOG_FORMAT=json' \
  --change 'WORKDIR /var/lib/meshgate' \
  - "$tag" >/dev/null
echo "built $tag from $binary"
