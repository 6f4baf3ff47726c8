#!/bin/sh
# Hardening benchmarks of docs/BENCHMARKS.md, against a baseline build of an
# earlier commit (BASE, default cf425ab: before the hardening) in the same run:
#   - RSS of `tessera serve --cache-mem 256MiB` under 1, 4 and 16 clients
#     that each send 64 reads of 32 MiB and never read (`tessera bench
#     nbd-flood`); the baseline under 1 client only (more would exhaust
#     this machine's memory);
#   - descriptors after 10,000 short NAME@LABEL connections (`tessera bench
#     nbd-labels`); the baseline after 500;
#   - warm sequential read (nbdcopy, best of 3) and 4 KiB random read p50
#     (`tessera bench nbd-latency`), this build against the baseline, in
#     alternating rounds (the buffer budget must not cost throughput).
# Usage: scripts/bench-hardening.sh [WORKDIR]   (default /var/tmp/tessera-bench-hardening)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench-hardening}
base=${BASE:-cf425ab}
mkdir -p "$work"
sh scripts/ensure-packages.sh umoci busybox-static libnbd-bin python3
cargo build --release --quiet
new="$repo/target/release/tessera"
if [ ! -x "$work/base/target/release/tessera" ] || [ "$(cat "$work/base/COMMIT" 2>/dev/null)" != "$base" ]; then
    rm -rf "$work/base"
    git worktree prune
    git worktree add --detach "$work/base" "$base" >/dev/null
    (cd "$work/base" && cargo build --release --quiet --bin tessera)
    echo "$base" > "$work/base/COMMIT"
fi
old="$work/base/target/release/tessera"

export TESSERA_HOME="$work/home"
if [ ! -f "$TESSERA_HOME/images/big.json" ]; then
    rm -rf "$work/layout" "$work/bundle" "$TESSERA_HOME"
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:big" >/dev/null
    umoci unpack --rootless --image "$work/layout:big" "$work/bundle" >/dev/null
    mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/data"
    cp /bin/busybox "$work/bundle/rootfs/bin/"
    head -c 1073741824 /dev/urandom > "$work/bundle/rootfs/data/blob"
    umoci repack --image "$work/layout:big" "$work/bundle" >/dev/null
    rm -rf "$work/bundle"
    "$new" import "oci:$work/layout:big" --name big --headroom 64MiB >/dev/null
fi

pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
now() { python3 -c 'import time; print(time.monotonic())'; }
wait_socket() { i=0; while [ ! -S "$1" ]; do i=$((i+1)); [ $i -lt 400 ] || { echo "no socket $1" >&2; exit 1; }; sleep 0.05; done; }
# serve BINARY NAME ARGS...: starts an agent on $work/NAME.sock with a fresh cache; sets $spid.
serve() {
    bin=$1; name=$2; shift 2
    rm -rf "$work/cache-$name" "$work/$name.sock"
    "$bin" serve --nbd "unix:$work/$name.sock" --cache-dir "$work/cache-$name" "$@" 2>>"$work/serve.log" &
    spid=$!; pids="$pids $spid"
    wait_socket "$work/$name.sock"
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }
seqread() { # URI -> seconds of the best of 3 warm runs
    nbdcopy "$1" null:
    best=""
    for _ in 1 2 3; do
        t0=$(now); nbdcopy "$1" null:; t1=$(now)
        best=$(python3 -c "import sys; a=float(sys.argv[1])-float(sys.argv[2]); b=sys.argv[3]; print(a if b=='' or a<float(b) else b)" "$t1" "$t0" "$best")
    done
    echo "$best"
}

echo "== flooding clients (64 reads of 32 MiB each, never read), 10 s, --cache-mem 256MiB"
for n in 1 4 16; do
    serve "$new" flood --cache-mem 256MiB
    "$new" bench nbd-flood --socket "$work/flood.sock" --export big --clients "$n" --seconds 10s --pid "$spid" > "$work/flood-$n.json"
    stop "$spid"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"this build, {r['clients']:2} clients: RSS idle {r['rss_idle_bytes']>>20} MiB, peak {r['rss_peak_bytes']>>20} MiB; well-behaved client {r['honest_reads_ok']}/{r['honest_reads']} reads ok, p50 {r['honest_latency'].get('p50_ms', float('nan')):.2f} ms\")" "$work/flood-$n.json"
done
serve "$old" flood-old --cache-mem 256MiB
"$new" bench nbd-flood --socket "$work/flood-old.sock" --export big --clients 1 --seconds 10s --pid "$spid" > "$work/flood-old.json"
stop "$spid"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"baseline {sys.argv[2]},  1 client: RSS idle {r['rss_idle_bytes']>>20} MiB, peak {r['rss_peak_bytes']>>20} MiB\")" "$work/flood-old.json" "$base"

echo "== label connections"
serve "$new" labels
"$new" bench nbd-labels --socket "$work/labels.sock" --export big --connections 10000 --pid "$spid" > "$work/labels.json"
stop "$spid"
serve "$old" labels-old
"$new" bench nbd-labels --socket "$work/labels-old.sock" --export big --connections 500 --pid "$spid" > "$work/labels-old.json"
stop "$spid"
for f in labels labels-old; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]}: {r['connections']} label connections in {r['seconds']:.1f} s: descriptors {r['descriptors_before']} -> {r['descriptors_after']}, RSS {r['rss_before_bytes']>>20} -> {r['rss_after_bytes']>>20} MiB\")" "$work/$f.json" "$f"
done

echo "== warm reads, this build vs $base, alternating rounds"
for round in 1 2 3; do
    for who in new old; do
        bin=$new; [ "$who" = old ] && bin=$old
        serve "$bin" "warm-$who" --cache-mem 2GiB
        uri="nbd+unix:///big?socket=$work/warm-$who.sock"
        s=$(seqread "$uri")
        "$new" bench nbd-latency --socket "$work/warm-$who.sock" --export big --count 20000 > "$work/lat-$who-$round.json"
        stop "$spid"
        echo "$s" > "$work/seq-$who-$round"
    done
    python3 - "$work" "$round" <<'PY'
import json, sys
w, r = sys.argv[1], sys.argv[2]
sn, so = float(open(f"{w}/seq-new-{r}").read()), float(open(f"{w}/seq-old-{r}").read())
ln, lo = json.load(open(f"{w}/lat-new-{r}.json")), json.load(open(f"{w}/lat-old-{r}.json"))
print(f"round {r}: sequential {sn:.2f} s vs {so:.2f} s -> throughput {so/sn:.3f}x; 4 KiB p50 {ln['p50_us']:.1f} us vs {lo['p50_us']:.1f} us -> {ln['p50_us']/lo['p50_us']:.3f}x")
PY
done
