#!/bin/sh
# S3 origin benchmarks of docs/BENCHMARKS.md, same run, same image (busybox
# and a 1 GiB layer of random data: a 1.1 GiB disk), against moto_server on
# loopback (in-memory, single Python process) and the local store:
#   - import into S3 vs into the local store (seconds);
#   - a cold full read through the agent (nbdcopy, empty caches), S3 vs local;
#   - S3 requests per stored chunk on import and on the cold read, counted
#     from moto's own request log (goal <= 1.05 each);
#   - moto's own latency for one 512 KiB GET, so server cost can be told
#     from ours;
#   - tessera run's time to first output with the origin behind the
#     throttle (30 ms, 100 MiB/s), S3 vs local (goal: within 10%).
# Needs moto_server (scripts/test.sh installs it in target/test-venv) and,
# for the run figure, qemu-system-x86.
# Usage: scripts/bench-s3.sh [WORKDIR]   (default /var/tmp/tessera-bench-s3)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench-s3}
mkdir -p "$work"
moto=${TESSERA_MOTO_SERVER:-$repo/target/test-venv/bin/moto_server}
[ -x "$moto" ] || moto=$(command -v moto_server) || { echo "moto_server is missing: run scripts/test.sh once, or pip install 'moto[server]'" >&2; exit 1; }
cargo build --release --quiet
tessera="$repo/target/release/tessera"
now() { python3 -c 'import time; print(time.monotonic())'; }
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

if [ ! -f "$work/layout/index.json" ]; then
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:big" >/dev/null
    umoci unpack --rootless --image "$work/layout:big" "$work/bundle" >/dev/null
    mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/data"
    cp /bin/busybox "$work/bundle/rootfs/bin/"
    ln -sf busybox "$work/bundle/rootfs/bin/cat"
    echo "hello from tessera" > "$work/bundle/rootfs/hello"
    head -c 1073741824 /dev/urandom > "$work/bundle/rootfs/data/blob"
    umoci repack --image "$work/layout:big" "$work/bundle" >/dev/null
    umoci config --image "$work/layout:big" --config.entrypoint /bin/cat --config.cmd /hello >/dev/null
    rm -rf "$work/bundle"
fi

rm -f "$work/moto.log"
"$moto" -H 127.0.0.1 -p 0 >"$work/moto.log" 2>&1 &
pids="$pids $!"
i=0; until grep -q "Running on http://" "$work/moto.log"; do i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.05; done
addr=$(grep -o "Running on http://[0-9.:]*" "$work/moto.log" | head -1 | sed 's|Running on http://||')
curl -s -X PUT "http://$addr/bench" >/dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
s3="s3://bench/t?endpoint=http://$addr&region=us-east-1"
count() { grep -c "$1" "$work/moto.log" || true; }

rm -rf "$work/home-local" "$work/home-s3"
t0=$(now); TESSERA_HOME="$work/home-local" "$tessera" import "oci:$work/layout:big" --name big --headroom 64MiB --json >"$work/import-local.json"; t1=$(now)
t2=$(now); TESSERA_HOME="$work/home-s3" TESSERA_STORE="$s3" "$tessera" import "oci:$work/layout:big" --name big --headroom 64MiB --json >"$work/import-s3.json"; t3=$(now)
stored=$(python3 -c "import json; print(json.load(open('$work/import-s3.json'))['new_chunks'])")
puts=$(count 'PUT /bench/t/chunks/')

# moto's own latency for one chunk GET (signed, with boto3, which comes
# with moto), median of 50.
key=$(curl -s "http://$addr/bench?list-type=2&prefix=t/chunks/&max-keys=1" | grep -o "<Key>[^<]*" | sed 's/<Key>//')
"$(dirname "$moto")/python3" - "$addr" "$key" >"$work/moto-latency.txt" <<'PY'
import sys, time, boto3
addr, key = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=f"http://{addr}", region_name="us-east-1")
lat = []
for _ in range(50):
    t = time.monotonic(); s3.get_object(Bucket="bench", Key=key)["Body"].read(); lat.append(time.monotonic() - t)
lat.sort(); print(f"{lat[len(lat)//2]*1000:.2f}")
PY

coldread() { # HOME STORE NAME -> seconds of a full read through a fresh agent
    rm -rf "$work/cache-$3" "$work/$3.sock"
    if [ -n "$2" ]; then
        TESSERA_HOME="$1" TESSERA_STORE="$2" "$tessera" serve --nbd "unix:$work/$3.sock" --cache-dir "$work/cache-$3" --cache-mem 256MiB 2>/dev/null &
    else
        TESSERA_HOME="$1" "$tessera" serve --nbd "unix:$work/$3.sock" --cache-dir "$work/cache-$3" --cache-mem 256MiB 2>/dev/null &
    fi
    p=$!; pids="$pids $p"
    i=0; until [ -S "$work/$3.sock" ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1; sleep 0.05; done
    a=$(now); nbdcopy "nbd+unix:///big?socket=$work/$3.sock" null:; b=$(now)
    kill $p; wait $p 2>/dev/null || true
    python3 -c "print($b - $a)"
}
gets_before=$(count 'GET /bench/t/chunks/')
read_local=$(coldread "$work/home-local" "" local)
read_s3=$(coldread "$work/home-s3" "$s3" s3)
gets=$(( $(count 'GET /bench/t/chunks/') - gets_before ))

runs=""
if command -v qemu-system-x86_64 >/dev/null; then
    for who in local s3 local s3; do
        store=""; [ "$who" = s3 ] && store="$s3"
        rm -rf "$work/cache-run-$who"
        TESSERA_HOME="$work/home-$who" TESSERA_STORE="$store" "$tessera" run big --accel tcg --no-profile --json \
            --cache-dir "$work/cache-run-$who" --origin-latency 30ms --origin-bandwidth 100MiB 2>/dev/null | tail -1 >"$work/run-$who.json"
        runs="$runs $who:$(python3 -c "import json; print(json.load(open('$work/run-$who.json'))['seconds_to_first_output'])")"
    done
fi

python3 - "$t0" "$t1" "$t2" "$t3" "$stored" "$puts" "$gets" "$read_local" "$read_s3" "$(cat "$work/moto-latency.txt")" "$runs" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
stored, puts, gets = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
read_local, read_s3, moto_ms = float(sys.argv[8]), float(sys.argv[9]), float(sys.argv[10])
print(f"import: local {t1-t0:.2f} s, S3 (moto) {t3-t2:.2f} s -> {(t3-t2)/(t1-t0):.2f}x the local time")
print(f"S3 PUTs per stored chunk on import: {puts}/{stored} = {puts/stored:.3f} (goal <= 1.05)")
print(f"cold full read through the agent: local {read_local:.2f} s, S3 {read_s3:.2f} s -> {read_s3/read_local:.2f}x")
print(f"S3 GETs per stored chunk on the cold read: {gets}/{stored} = {gets/stored:.3f} (goal <= 1.05)")
print(f"moto's own latency, one 512 KiB GET (median of 50): {moto_ms:.2f} ms")
runs = [r.split(":") for r in sys.argv[11].split()]
if runs:
    loc = [float(v) for w, v in runs if w == "local"]; s3 = [float(v) for w, v in runs if w == "s3"]
    print(f"tessera run, first output through the throttle (30 ms, 100 MiB/s): local {', '.join(f'{v:.2f}' for v in loc)} s; "
          f"S3 {', '.join(f'{v:.2f}' for v in s3)} s -> {min(s3)/min(loc):.3f}x (best of each; goal within 10%)")
PY
