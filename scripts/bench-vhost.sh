#!/bin/sh
# Benchmarks of the microVM worker (issue 15) in docs/BENCHMARKS.md, all
# under TCG, on one image: busybox, scripts/vdbench.c (built static here),
# 256 MiB (/data) and 32 MiB (/small) of random bytes.
#   1. boot: seconds_to_entrypoint of `sh -c true`, median of 10, for each
#      kernel (built on microvm, Debian's on q35) and disk (vhost-user, nbd)
#   2. the disk inside the guest, vhost-user vs NBD (private agent, chunks
#      warm in its memory): O_DIRECT sequential MiB/s and 4 KiB read p50/p99
#   3. a VM reading its disk while the shared agent is killed (kill -9) and
#      started again: its longest wait for one read vs the restart's length
#   4. 20 VMs of the image at once on one shared agent, empty caches:
#      origin requests vs one VM alone, and the agent's peak RSS
#      (anonymous memory; guest memory the agent maps is counted apart)
# Usage: scripts/bench-vhost.sh [WORKDIR]   (default /var/tmp/tessera-bench-vhost)
#        SECTIONS="2 4" scripts/bench-vhost.sh   runs only those parts
set -eu
cd "$(dirname "$0")/.."
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
work=${1:-/var/tmp/tessera-bench-vhost}
mkdir -p "$work"
cargo build --release --quiet
tessera="$(pwd)/target/release/tessera"
export TESSERA_HOME="$work/home"
sh scripts/guest-kernel.sh >/dev/null
json() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print($1)"; }

if [ ! -f "$TESSERA_HOME/images/vb.json" ]; then
    rm -rf "$work/layout" "$work/bundle" "$TESSERA_HOME"
    gcc -static -O2 -o "$work/vdbench" scripts/vdbench.c
    umoci init --layout "$work/layout"
    umoci new --image "$work/layout:vb"
    umoci unpack --image "$work/layout:vb" "$work/bundle" >/dev/null
    root="$work/bundle/rootfs"
    mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp"
    cp /bin/busybox "$work/vdbench" "$root/bin/"
    for applet in sh cat; do ln -s busybox "$root/bin/$applet"; done
    head -c 256M /dev/urandom >"$root/data"
    head -c 32M /dev/urandom >"$root/small"
    umoci repack --image "$work/layout:vb" "$work/bundle" >/dev/null
    umoci config --image "$work/layout:vb" --config.entrypoint /bin/sh --config.entrypoint -c --config.cmd true
    rm -rf "$work/bundle"
    "$tessera" import "oci:$work/layout:vb" --name vb >/dev/null
fi

sections=${SECTIONS:-1 2 3 4}
want() { case " $sections " in *" $1 "*) return 0 ;; esac; return 1; }

want 1 && echo "## 1. boot (seconds_to_entrypoint, median of 10)"
want 1 && for config in "debian nbd" "debian vhost-user" "built nbd" "built vhost-user"; do
    set -- $config
    for i in 1 2 3 4 5 6 7 8 9 10; do
        "$tessera" run vb --accel tcg --kernel "$1" --disk "$2" --json -- true | json 'r["seconds_to_entrypoint"]'
    done | sort -n | sed -n '5,6p' | python3 -c "import sys; v=[float(x) for x in sys.stdin]; print('kernel=$1 disk=$2 median', round(sum(v)/2, 3))"
done

want 2 && echo "## 2. disk inside the guest (warm, private agent)"
want 2 && for disk in nbd vhost-user; do
    "$tessera" run vb --accel tcg --disk "$disk" -- 'vdbench seq /data >/dev/null; vdbench seq /data; vdbench rand /data 4000' |
        tr '\n' ' ' | sed "s/^/disk=$disk /"
    echo
done

serve() {
    rm -f "$work/ready"
    "$tessera" serve --metrics 127.0.0.1:0 --ready-file "$work/ready" "$@" 2>>"$work/serve.log" &
    spid=$!
    while [ ! -s "$work/ready" ]; do sleep 0.02; done
    metrics=$(json 'r["metrics"]' <"$work/ready")
}
metric() { curl -s "http://$metrics/metrics" | awk -v k="$1" '$1 == k {print $2}'; }

if want 3; then
echo "## 3. a VM's longest wait for a read across kill -9 and restart of the agent"
serve
"$tessera" run vb --accel tcg -- 'vdbench seq /small >/dev/null; vdbench watch /small 8' >"$work/watch.out" &
rpid=$!
sleep 4
t0=$(python3 -c 'import time; print(time.monotonic())')
kill -9 "$spid"
wait "$spid" 2>/dev/null || true
serve
t1=$(python3 -c 'import time; print(time.monotonic())')
wait "$rpid"
echo "restart $(python3 -c "print(round($t1 - $t0, 3))") s; the VM: $(cat "$work/watch.out")"
kill "$spid"; wait "$spid" 2>/dev/null || true
fi

want 4 || exit 0
echo "## 4. 20 VMs of one image on one agent (empty caches)"
rm -rf "$work/cache1"
serve --cache-dir "$work/cache1"
"$tessera" run vb --accel tcg --memory 128 --no-profile -- 'cat /small >/dev/null' >/dev/null
one=$(metric tessera_origin_requests_total)
kill "$spid"; wait "$spid" 2>/dev/null || true
rm -rf "$work/cache20"
serve --cache-dir "$work/cache20"
t0=$(python3 -c 'import time; print(time.monotonic())')
pids=""
for i in $(seq 1 20); do
    "$tessera" run vb --accel tcg --memory 128 --no-profile -- 'cat /small >/dev/null' >/dev/null &
    pids="$pids $!"
done
# The agent's own memory (anonymous) and the guests' memory it maps (shared), sampled.
rm -f "$work/stop-sampling"
(anon=0; shmem=0; while kill -0 "$spid" 2>/dev/null && [ ! -f "$work/stop-sampling" ]; do
    a=$(awk '/RssAnon/ {print $2}' "/proc/$spid/status"); s=$(awk '/RssShmem/ {print $2}' "/proc/$spid/status")
    [ "${a:-0}" -gt "$anon" ] && anon=$a; [ "${s:-0}" -gt "$shmem" ] && shmem=$s
    echo "$anon $shmem" >"$work/rss"; sleep 0.1; done) &
sampler=$!
for p in $pids; do wait "$p"; done
t1=$(python3 -c 'import time; print(time.monotonic())')
touch "$work/stop-sampling"; wait "$sampler"
twenty=$(metric tessera_origin_requests_total)
read -r anon shmem <"$work/rss"
echo "origin requests: one VM $one, 20 VMs $twenty; 20 VMs done in $(python3 -c "print(round($t1 - $t0, 1))") s; agent peak RSS: own $((anon / 1024)) MiB, guest memory mapped $((shmem / 1024)) MiB"
kill "$spid"; wait "$spid" 2>/dev/null || true
