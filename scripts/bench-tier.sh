#!/bin/sh
# Cache-tier benchmarks of docs/BENCHMARKS.md (`tessera bench tier`):
#   - chunk read latency p50/p99 from the tier (4+1, first 4 of 5 stripes)
#     against the origin through the run issue's throttle (30 ms, 100 MiB/s)
#   - tail: five cache nodes, each in a network namespace of its own; p99 of
#     first-k reads with node 4's answers 50 ms late, against the healthy
#     p99 (the two read in turn, in one process), and a client that waits
#     for 4 given nodes. The delay is a relay in node 4's namespace
#     (`tessera bench relay`): this kernel has no sch_netem.
#   - storage overhead of the tier per chunk
# Needs root (network namespaces). Builds its own image: busybox and 96 MiB
# of incompressible data.
# Usage: scripts/bench-tier.sh [WORKDIR]   (default /var/tmp/tessera-bench-tier)
set -eu
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/tessera-bench-tier}
reads=${READS:-2000}
rounds=${ROUNDS:-5}
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
for i in 0 1 2 3 4; do
    nodes="$nodes${nodes:+,}10.77.$i.2:7070"
    n=0; until python3 -c "import socket; socket.create_connection(('10.77.$i.2', 7070), 1)" 2>/dev/null; do
        n=$((n+1)); [ $n -lt 100 ] || { echo "node $i did not start" >&2; cat "$work/node$i.log" >&2; exit 1; }; sleep 0.1
    done
done
# Node 4 is also reachable through a relay in its namespace that passes its
# answers on 50 ms late (`tessera bench relay`, as `tc netem delay 50ms`
# on its link would; this kernel has no sch_netem, and a relay lets the
# same moment be timed both ways). With five nodes every chunk has a stripe
# on each, so the two lists read the same stripes.
ip netns exec tstier4 "$tessera" bench relay --listen 10.77.4.2:7071 --target 10.77.4.2:7070 --delay 50ms 2>/dev/null &
pids="$pids $!"
n=0; until python3 -c "import socket; socket.create_connection(('10.77.4.2', 7071), 1)" 2>/dev/null; do
    n=$((n+1)); [ $n -lt 100 ] || { echo "the relay did not start" >&2; exit 1; }; sleep 0.1
done
slow=$(echo "$nodes" | sed 's/10.77.4.2:7070/10.77.4.2:7071/')
bench() { "$tessera" bench tier tier "$@"; }

echo "warming the tier" >&2
bench --cache-nodes "$nodes" --warm --count 0 --origin-reads 0 >/dev/null
sync
# Each round reads the healthy list and the one with node 4 late in turn;
# p99 on a small shared machine swings from run to run, so rounds.
for round in $(seq "$rounds"); do
    echo "round $round: healthy and node 4 50 ms late, read by read in turn" >&2
    bench --cache-nodes "$nodes" --versus "$slow" --count "$reads" --origin-reads $([ $round = 1 ] && echo 100 || echo 0) >"$work/round$round.json"
done
echo "the naive client: waiting for 4 given nodes" >&2
bench --cache-nodes "$nodes" --policy data-stripes --count "$reads" --origin-reads 0 >"$work/healthy-naive.json"
bench --cache-nodes "$slow" --policy data-stripes --count "$reads" --origin-reads 0 >"$work/slow-naive.json"
stored=$(find "$work"/node?/stripes -type f -printf "%s\n" | awk "{s += \$1} END {print s}")
sealed=$(find "$work/home/chunks" -type f -printf "%s\n" | awk "{s += \$1} END {print s}")
python3 - "$work" "$stored" "$sealed" "$rounds" <<'PY'
import json, statistics, sys
work = sys.argv[1]
load = lambda n: json.load(open(f"{work}/{n}.json"))
r1, hn, sn = load("round1"), load("healthy-naive"), load("slow-naive")
rounds = [(load(f"round{r}")["first_k"], load(f"round{r}")["versus"]) for r in range(1, int(sys.argv[4]) + 1)]
ratios = [s["p99_ms"] / h["p99_ms"] for h, s in rounds]
stored, sealed = int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({
    "reads_per_round": r1["reads"],
    "tier_p50_ms": r1["first_k"]["p50_ms"], "tier_p99_ms": r1["first_k"]["p99_ms"],
    "origin_p50_ms": r1["origin"]["p50_ms"], "origin_p99_ms": r1["origin"]["p99_ms"],
    "origin_over_tier_p50": r1["origin"]["p50_ms"] / r1["first_k"]["p50_ms"],
    "origin_over_tier_p99": r1["origin"]["p99_ms"] / r1["first_k"]["p99_ms"],
    "healthy_first_k_p50_ms": [h["p50_ms"] for h, _ in rounds],
    "healthy_first_k_p99_ms": [h["p99_ms"] for h, _ in rounds],
    "slow_first_k_p50_ms": [s["p50_ms"] for _, s in rounds],
    "slow_first_k_p99_ms": [s["p99_ms"] for _, s in rounds],
    "first_k_slow_over_healthy_p99": ratios,
    "first_k_slow_over_healthy_p99_median": statistics.median(ratios),
    "healthy_data_stripes_p50_ms": hn["data_stripes"]["p50_ms"], "healthy_data_stripes_p99_ms": hn["data_stripes"]["p99_ms"],
    "slow_data_stripes_p50_ms": sn["data_stripes"]["p50_ms"], "slow_data_stripes_p99_ms": sn["data_stripes"]["p99_ms"],
    "data_stripes_slow_over_healthy_first_k_p99": sn["data_stripes"]["p99_ms"] / rounds[0][0]["p99_ms"],
    "tier_bytes_on_disk_over_sealed_chunks": stored / sealed,
}, indent=1))
PY
