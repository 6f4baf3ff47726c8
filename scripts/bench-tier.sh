#!/bin/sh
# Cache-tier benchmarks of docs/BENCHMARKS.md (`tessera bench tier`):
#   - chunk read latency p50/p99 from the tier (4+1, first 4 of 5 stripes)
#     against the origin through the run issue's throttle (30 ms, 100 MiB/s)
#   - tail: five cache nodes, each in a network namespace of its own; p99 of
#     first-k reads with one node's answers 50 ms late, against the healthy
#     p99, and against a client that waits for the 4 data stripes. The delay
#     is `tc netem delay 50ms` where the kernel has sch_netem; otherwise a
#     userspace relay in each node's namespace (scripts/delay-proxy.py, in
#     front of all five, delaying only node 4's).
#   - storage overhead of the tier per chunk
# Needs root (network namespaces). Builds its own image: busybox and 96 MiB
# of incompressible data.
# Usage: scripts/bench-tier.sh [WORKDIR]   (default /var/tmp/tessera-bench-tier)
set -eu
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/tessera-bench-tier}
reads=${READS:-1000}
cargo build --release --quiet -p tessera-cli
tessera="$(pwd)/target/release/tessera"
export TESSERA_HOME="$work/home"

pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for i in 0 1 2 3 4; do ip netns del "tstier$i" 2>/dev/null || true; done
}
trap cleanup EXIT

# The image.
if [ ! -f "$work/home/images/tier.json" ]; then
    rm -rf "$work" && mkdir -p "$work"
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:v1"
    umoci unpack --image "$work/layout:v1" "$work/bundle" >/dev/null 2>&1
    mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/data"
    cp /bin/busybox "$work/bundle/rootfs/bin/"
    head -c 100663296 /dev/urandom >"$work/bundle/rootfs/data/blob"
    umoci repack --image "$work/layout:v1" "$work/bundle" >/dev/null
    rm -rf "$work/bundle"
    "$tessera" import "oci:$work/layout:v1" --name tier --headroom 16MiB
fi

# Five nodes, node i in netns tstier$i at 10.77.$i.2, reached over a veth
# pair from 10.77.$i.1.
nodes=""
for i in 0 1 2 3 4; do
    ns="tstier$i"
    ip netns del "$ns" 2>/dev/null || true
    ip link del "tsv$i" 2>/dev/null || true
    ip netns add "$ns"
    ip link add "tsv$i" type veth peer name eth0 netns "$ns"
    ip addr add "10.77.$i.1/24" dev "tsv$i"
    ip link set "tsv$i" up
    ip -n "$ns" addr add "10.77.$i.2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    rm -rf "$work/node$i"
    ip netns exec "$ns" "$tessera" cachenode --listen "10.77.$i.2:7070" --dir "$work/node$i" --mem 1GiB 2>"$work/node$i.log" &
    pids="$pids $!"
done
# Can the kernel delay a link? If not, relays stand in front of every node.
if ip netns exec tstier4 tc qdisc add dev eth0 root netem delay 0ms 2>/dev/null; then
    ip netns exec tstier4 tc qdisc del dev eth0 root
    delay=netem port=7070
else
    delay=relay port=7071
    for i in 0 1 2 3 4; do
        ip netns exec "tstier$i" python3 scripts/delay-proxy.py "10.77.$i.2:7071" "10.77.$i.2:7070" 0 &
        eval "relay$i=$!"; pids="$pids $!"
    done
fi
for i in 0 1 2 3 4; do
    nodes="$nodes${nodes:+,}10.77.$i.2:$port"
    for p in 7070 $port; do
        n=0; until python3 -c "import socket; socket.create_connection(('10.77.$i.2', $p), 1)" 2>/dev/null; do
            n=$((n+1)); [ $n -lt 100 ] || { echo "node $i did not start" >&2; cat "$work/node$i.log" >&2; exit 1; }; sleep 0.1
        done
    done
done

echo "healthy (warming the tier first)" >&2
"$tessera" bench tier tier --cache-nodes "$nodes" --warm --count "$reads" --origin-reads 100 >"$work/healthy.json"
cat "$work/healthy.json"
# Node 4 answers 50 ms late.
if [ $delay = netem ]; then
    ip netns exec tstier4 tc qdisc add dev eth0 root netem delay 50ms
else
    kill "$relay4"; sleep 0.2
    ip netns exec tstier4 python3 scripts/delay-proxy.py "10.77.4.2:7071" "10.77.4.2:7070" 50 &
    pids="$pids $!"; sleep 0.5
fi
echo "node 4 slowed by 50 ms ($delay)" >&2
"$tessera" bench tier tier --cache-nodes "$nodes" --count "$reads" --origin-reads 0 >"$work/slow.json"
cat "$work/slow.json"
stored=$(du -sb "$work"/node?/stripes | awk '{s += $1} END {print s}')
sealed=$(du -sb "$work/home/chunks" | awk '{print $1}')
python3 - "$work/healthy.json" "$work/slow.json" "$stored" "$sealed" "$delay" <<'PY'
import json, sys
h, s = (json.load(open(p)) for p in sys.argv[1:3])
stored, sealed = int(sys.argv[3]), int(sys.argv[4])
fk = h["first_k"]["p99_ms"]
print(json.dumps({
    "tier_p50_ms": h["first_k"]["p50_ms"], "tier_p99_ms": fk,
    "origin_p50_ms": h["origin"]["p50_ms"], "origin_p99_ms": h["origin"]["p99_ms"],
    "origin_over_tier_p50": h["origin"]["p50_ms"] / h["first_k"]["p50_ms"],
    "healthy_first_k_p99_ms": fk, "healthy_data_stripes_p99_ms": h["data_stripes"]["p99_ms"],
    "slow_first_k_p99_ms": s["first_k"]["p99_ms"], "slow_data_stripes_p99_ms": s["data_stripes"]["p99_ms"],
    "slow_data_stripes_p50_ms": s["data_stripes"]["p50_ms"],
    "first_k_slow_over_healthy_p99": s["first_k"]["p99_ms"] / fk,
    "data_stripes_slow_over_healthy_p99": s["data_stripes"]["p99_ms"] / fk,
    "tier_bytes_on_disk_over_sealed_chunks": stored / sealed,
    "delay": sys.argv[5],
}, indent=1))
PY
