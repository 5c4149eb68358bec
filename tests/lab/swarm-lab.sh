#!/usr/bin/env bash
# A real multi-node Docker Swarm on this machine: one dockerd per network namespace (see
# ../shared/SWARM-LAB.md for what was observed and the traps this script gets past).
#
#   tests/lab/swarm-lab.sh up [WORKERS_AS_MANAGERS]   1 manager + 2 workers (or 3 managers with "managers")
#   tests/lab/swarm-lab.sh stop N | start N           stops node N's engine by PID (its containers stop too), starts it again
#   tests/lab/swarm-lab.sh down                       stops the engines by PID, removes everything
#   tests/lab/swarm-lab.sh env                        prints the addresses and sockets (sourceable)
#
# Addresses: the underlay is 198.18.50.0/24 (the benchmarking range, used nowhere else here):
# node i is 198.18.50.1i, the machine reaches them from the veth `mglab-host` (198.18.50.1),
# and every node's default route leads into the sink namespace (198.18.50.254), which counts
# what reaches it and forwards nothing: no packet a test makes can leave the machine.
# The machine's own engine is never touched. Run as root.
set -euo pipefail

LAB=${MGLAB_NAME:-mglab}
NODES=${MGLAB_NODES:-3}
ROOT=/var/lib/$LAB
NET=198.18.50
SINK=$NET.254

node_ns() { echo "$LAB-n$1"; }
node_sock() { echo "unix://$ROOT/n$1/docker.sock"; }
dk() { local i=$1; shift; docker -H "$(node_sock "$i")" "$@"; }

cgroup_mounts() {
  # The machine's cgroup hierarchies, as `type path options` lines.
  awk '$3 == "cgroup" || $3 == "cgroup2" { print $3, $2, $4 }' /proc/self/mounts
}

start_node() {
  local i=$1 ns dir
  ns=$(node_ns "$i")
  dir=$ROOT/n$i
  mkdir -p "$dir/etc-docker" "$dir/data"
  echo '{}' > "$dir/etc-docker/daemon.json"
  # No resolver: a registry lookup fails at once instead of timing out in the sink.
  echo 'nameserver 127.0.0.1' > "$dir/resolv.conf"
  local mounts
  mounts=$(cgroup_mounts)
  # `ip netns exec` re-mounts /sys (hiding the cgroups) in a mount namespace of its own: mount
  # the cgroups (and a bpffs) again, give the node its own /run (so a container mounting
  # /var/run/docker.sock gets this node's engine) and /etc/docker, and its own host name.
  ip netns exec "$ns" unshare --uts --mount --propagation private sh -c '
    set -e
    mount -t tmpfs mglab-cgroup /sys/fs/cgroup
    echo "$1" | while read -r type path opts; do
      mkdir -p "$path"
      mount -t "$type" -o "$opts" "$type" "$path"
    done
    # A bpffs of its own, as systemd mounts one on every machine (the agent keeps its L4
    # reply table there across updates); gone with the namespace.
    mount -t bpf mglab-bpf /sys/fs/bpf
    mount -t tmpfs mglab-run /run
    mkdir -p /run/lock
    mount --bind "$2/etc-docker" /etc/docker
    mount --bind "$2/resolv.conf" /etc/resolv.conf
    hostname "$3"
    exec dockerd --config-file /etc/docker/daemon.json --data-root "$2/data" --exec-root /run/docker \
      --pidfile "$2/dockerd.pid" -H unix:///var/run/docker.sock -H "unix://$2/docker.sock" \
      --storage-driver vfs --bip "172.31.$4.1/24" --cgroup-parent "/$3" --iptables=true \
      >"$2/dockerd.log" 2>&1
  ' sh "$mounts" "$dir" "$ns" "$i" &
}

wait_engine() {
  local i=$1
  for _ in $(seq 1 300); do
    dk "$i" info >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "node $i: dockerd did not answer; its log:" >&2
  tail -20 "$ROOT/n$i/dockerd.log" >&2
  return 1
}

up() {
  local managers=${1:-one}
  [ ! -e "$ROOT" ] || down
  mkdir -p "$ROOT"
  # The underlay: a bridge in a namespace of its own (the machine's engine sets FORWARD DROP
  # and bridge-nf-call-iptables in the root namespace).
  ip netns add "$LAB-br"
  ip -n "$LAB-br" link set lo up
  ip -n "$LAB-br" link add br0 type bridge
  ip -n "$LAB-br" link set br0 up
  # The machine's own address on the underlay, for the tests.
  ip link add "$LAB-host" type veth peer name host netns "$LAB-br"
  ip -n "$LAB-br" link set host master br0 up
  ip addr add "$NET.1/24" dev "$LAB-host"
  ip link set "$LAB-host" up
  # A local sender's checksums are partial on a veth, a NIC's are full (XDP-NOTES): make the
  # machine's test traffic look like a NIC's.
  ethtool -K "$LAB-host" tx off >/dev/null
  # The sink: every node's default route; counts, forwards nothing.
  ip netns add "$LAB-sink"
  ip -n "$LAB-sink" link set lo up
  ip -n "$LAB-br" link add sink type veth peer name eth0 netns "$LAB-sink"
  ip -n "$LAB-br" link set sink master br0 up
  ip -n "$LAB-sink" addr add "$SINK/24" dev eth0
  ip -n "$LAB-sink" link set eth0 up
  ip netns exec "$LAB-sink" sysctl -qw net.ipv4.ip_forward=0
  ip netns exec "$LAB-sink" iptables -t raw -N COUNT
  ip netns exec "$LAB-sink" iptables -t raw -A PREROUTING -i eth0 -m addrtype ! --dst-type LOCAL -j COUNT
  # What must never leave a node: traffic to task and overlay addresses (the engines'
  # address pools) and to the ports the lab routes or publishes.
  for dst in 10.0.0.0/8 172.16.0.0/12; do
    ip netns exec "$LAB-sink" iptables -t raw -A COUNT -d "$dst" -p tcp
    ip netns exec "$LAB-sink" iptables -t raw -A COUNT -d "$dst" -p udp
  done
  ip netns exec "$LAB-sink" iptables -t raw -A COUNT -p tcp -m multiport --dports 80,443,7380,7381,8080:8099
  for i in $(seq 1 "$NODES"); do
    local ns
    ns=$(node_ns "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$LAB-br" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$LAB-br" link set "v$i" master br0 up
    # XDP sends out of a veth reach its peer only with GRO on there (XDP-NOTES).
    ip netns exec "$LAB-br" ethtool -K "v$i" gro on >/dev/null
    ip -n "$ns" addr add "$NET.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$SINK"
    start_node "$i"
  done
  for i in $(seq 1 "$NODES"); do wait_engine "$i"; done
  dk 1 swarm init --advertise-addr "$NET.11" --listen-addr "$NET.11:2377" >/dev/null
  local role=worker
  [ "$managers" = managers ] && role=manager
  local token
  token=$(dk 1 swarm join-token -q "$role")
  for i in $(seq 2 "$NODES"); do
    dk "$i" swarm join --token "$token" --advertise-addr "$NET.1$i" --listen-addr "$NET.1$i:2377" "$NET.11:2377" >/dev/null
  done
  echo "lab $LAB up: $NODES nodes ($([ "$role" = manager ] && echo "all managers" || echo "1 manager"))"
}

stop_engine() {
  local i=$1 pidfile=$ROOT/n$1/dockerd.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  # An engine killed before it stopped its containers leaves them running under their
  # shims (a manager's agent would go on serving the feed): a stopped engine's containers
  # stop with it, as on a machine that goes down.
  for procs in /sys/fs/cgroup/pids/"$LAB-n$i"/*/cgroup.procs; do
    [ -f "$procs" ] && xargs -r kill -KILL < "$procs" 2>/dev/null || true
  done
}

down() {
  for i in $(seq 1 "$NODES"); do stop_engine "$i" & done
  wait
  # Whatever the engines left running in the nodes' cgroups (shims, containers).
  for i in $(seq 1 "$NODES"); do
    for procs in /sys/fs/cgroup/pids/"$LAB-n$i"/cgroup.procs /sys/fs/cgroup/pids/"$LAB-n$i"/*/cgroup.procs; do
      [ -f "$procs" ] && xargs -r kill -KILL < "$procs" 2>/dev/null || true
    done
  done
  for i in $(seq 1 "$NODES"); do ip netns del "$(node_ns "$i")" 2>/dev/null || true; done
  ip netns del "$LAB-sink" 2>/dev/null || true
  ip netns del "$LAB-br" 2>/dev/null || true
  ip link del "$LAB-host" 2>/dev/null || true
  for i in $(seq 1 "$NODES"); do
    find /sys/fs/cgroup/*/"$LAB-n$i" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  rm -rf "$ROOT"
}

sink_count() {
  ip netns exec "$LAB-sink" iptables -t raw -L COUNT -v -x -n | awk 'NR > 2 { n += $1 } END { print n + 0 }'
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  stop) stop_engine "$2" ;;
  start) start_node "$2"; wait_engine "$2" ;;
  sink-count) sink_count ;;
  env)
    for i in $(seq 1 "$NODES"); do echo "NODE${i}_ADDR=$NET.1$i NODE${i}_DOCKER_HOST=$(node_sock "$i") NODE${i}_NS=$(node_ns "$i")"; done
    ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
