#!/bin/sh
# Serve benchmarks of docs/BENCHMARKS.md: tessera serve against qemu-nbd
# serving the `tessera export` raw file, both on unix sockets, same run.
#   - warm sequential read throughput (nbdcopy to null:), goal >= 1.0x qemu-nbd
#   - warm 4 KiB random read latency, one request at a time (same client for
#     both: `tessera bench nbd-latency`), goal p50 <= 1.2x qemu-nbd
#   - cold read of the whole image from the local store, MiB/s, and as a
#     ratio to opening chunks on all cores (`tessera bench seal`)
#   - peak RSS of the agent serving the image, with the memory cache bounded
# Needs the image of scripts/bench-import.sh (run that first).
# Usage: scripts/bench-serve.sh [WORKDIR]   (default /var/tmp/tessera-bench)
set -eu
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/tessera-bench}
home="$work/home-gzip"
[ -f "$home/images/big.json" ] || { echo "run scripts/bench-import.sh first" >&2; exit 1; }
cargo build --release --quiet
tessera="$(pwd)/target/release/tessera"
export TESSERA_HOME="$home"

pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_socket() { i=0; while [ ! -S "$1" ]; do i=$((i+1)); [ $i -lt 200 ] || { echo "no socket $1" >&2; exit 1; }; sleep 0.05; done; }
now() { python3 -c 'import time; print(time.monotonic())'; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
seqread() { # URI -> seconds of the best of 3 warm runs
    nbdcopy "$1" null:
    best=""
    for _ in 1 2 3; do
        t0=$(now); nbdcopy "$1" null:; t1=$(now)
        best=$(python3 -c "import sys; a=float(sys.argv[1])-float(sys.argv[2]); b=sys.argv[3]; print(a if b=='' or a<float(b) else b)" "$t1" "$t0" "$best")
    done
    echo "$best"
}

"$tessera" export big "$work/big.raw" >/dev/null
disk=$(stat -c %s "$work/big.raw")
stored=$(python3 -c "import json,sys; print(json.load(sys.stdin)['stored_chunks']*524288)" <<EOF2
$("$tessera" inspect big --json)
EOF2
)
"$tessera" bench seal "$work/big.raw" >"$work/seal-serve.json"

rm -f "$work/qemu.sock" "$work/tessera.sock"
qemu-nbd -t -r -f raw -x big --socket="$work/qemu.sock" "$work/big.raw" &
qpid=$!; pids="$pids $qpid"
rm -rf "$work/cache-warm"
"$tessera" serve --nbd "unix:$work/tessera.sock" --cache-dir "$work/cache-warm" --cache-mem 4GiB 2>/dev/null &
tpid=$!; pids="$pids $tpid"
wait_socket "$work/qemu.sock"; wait_socket "$work/tessera.sock"
q_uri="nbd+unix:///big?socket=$work/qemu.sock"
t_uri="nbd+unix:///big?socket=$work/tessera.sock"

q_seq=$(seqread "$q_uri")
t_seq=$(seqread "$t_uri")
"$tessera" bench nbd-latency --socket "$work/qemu.sock" --export big --count 20000 >"$work/lat-qemu.json"
"$tessera" bench nbd-latency --socket "$work/tessera.sock" --export big --count 20000 >"$work/lat-tessera.json"
q_rss=$(hwm $qpid)
kill $tpid; wait $tpid 2>/dev/null || true

# Cold: an empty cache, memory bounded to 256 MiB.
rm -rf "$work/cache-cold"
"$tessera" serve --nbd "unix:$work/tessera.sock" --cache-dir "$work/cache-cold" --cache-mem 256MiB 2>/dev/null &
tpid=$!; pids="$pids $tpid"
wait_socket "$work/tessera.sock"
t0=$(now); nbdcopy "$t_uri" null:; t1=$(now)
cold_rss=$(hwm $tpid)
kill $tpid; wait $tpid 2>/dev/null || true

python3 - "$disk" "$stored" "$q_seq" "$t_seq" "$work/lat-qemu.json" "$work/lat-tessera.json" "$t0" "$t1" "$work/seal-serve.json" "$q_rss" "$cold_rss" <<'PY'
import json, sys
disk, stored, q_seq, t_seq = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
lq, lt = json.load(open(sys.argv[5])), json.load(open(sys.argv[6]))
cold = float(sys.argv[8]) - float(sys.argv[7])
seal = json.load(open(sys.argv[9]))
q_rss, cold_rss = int(sys.argv[10]), int(sys.argv[11])
mib = 2**20
print(f"image: {disk/2**30:.2f} GiB disk, {stored/mib:.0f} MiB stored")
print(f"warm sequential read (nbdcopy, best of 3): qemu-nbd {q_seq:.2f} s, tessera {t_seq:.2f} s; "
      f"tessera/qemu-nbd throughput {q_seq/t_seq:.2f}x (goal >= 1.0)")
print(f"warm 4 KiB random reads, queue depth 1: p50 qemu-nbd {lq['p50_us']:.1f} us, tessera {lt['p50_us']:.1f} us "
      f"-> {lt['p50_us']/lq['p50_us']:.2f}x (goal <= 1.2); p99 {lq['p99_us']:.1f} / {lt['p99_us']:.1f} us")
print(f"cold read of the whole image from the local store: {cold:.2f} s = {stored/mib/cold:.0f} MiB/s of stored chunks; "
      f"open limit of the CPU {seal['open_mib_per_second']:.0f} MiB/s -> {stored/mib/cold/seal['open_mib_per_second']:.2f} of it")
print(f"peak RSS: tessera serve with --cache-mem 256MiB after a cold full read {cold_rss/1024:.0f} MiB; qemu-nbd {q_rss/1024:.0f} MiB")
PY
rm -f "$work/big.raw"
