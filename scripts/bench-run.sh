#!/bin/sh
# Run benchmarks of docs/BENCHMARKS.md (issue 5), on the image of
# scripts/bench-import.sh (Debian minbase + python3 + 1.3 GB of files the
# program never reads), through the origin throttle (30 ms per request,
# 100 MiB/s shared), each case with an empty cache:
#   - lazy, no profile: time to the entrypoint's first output, bytes fetched
#   - lazy with the start-up profile recorded by a first run
#   - download the whole image (every stored chunk through the same throttle),
#     then boot from the local copy: the baseline
# Usage: scripts/bench-run.sh [WORKDIR]   (default /var/tmp/tessera-bench)
set -eu
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/tessera-bench}
export TESSERA_HOME="$work/home-gzip"
[ -f "$TESSERA_HOME/images/big.json" ] || { echo "run scripts/bench-import.sh first" >&2; exit 1; }
export TESSERA_KERNEL_DIR="$work/kernel"
cargo build --release --quiet
tessera="$(pwd)/target/release/tessera"
throttle="--origin-latency 30ms --origin-bandwidth 100MiB"
prog="python3 -c print(42)"
accel=${ACCEL:-tcg}

manifest=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['manifest'])" "$TESSERA_HOME/images/big.json")
rm -f "$TESSERA_HOME/manifests/$manifest.profile"
fresh() { rm -rf "$work/cache-run"; echo "$work/cache-run"; }

# shellcheck disable=SC2086
"$tessera" run big --accel "$accel" --json --no-profile $throttle --cache-dir "$(fresh)" -- $prog | tail -1 >"$work/run-lazy.json"
# shellcheck disable=SC2086
"$tessera" run big --accel "$accel" --json $throttle --cache-dir "$(fresh)" -- $prog | tail -1 >"$work/run-record.json"
# shellcheck disable=SC2086
"$tessera" run big --accel "$accel" --json $throttle --cache-dir "$(fresh)" -- $prog | tail -1 >"$work/run-profiled.json"

# Baseline: every stored chunk through the throttle, then a boot from local.
rm -f "$work/dl.sock"
# shellcheck disable=SC2086
"$tessera" serve --nbd "unix:$work/dl.sock" $throttle --cache-dir "$(fresh)" --cache-mem 4GiB 2>/dev/null &
spid=$!
i=0; while [ ! -S "$work/dl.sock" ]; do i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.05; done
t0=$(python3 -c 'import time; print(time.monotonic())')
nbdcopy --connections=4 --requests=16 "nbd+unix:///big?socket=$work/dl.sock" null:
t1=$(python3 -c 'import time; print(time.monotonic())')
kill $spid; wait $spid 2>/dev/null || true
# shellcheck disable=SC2086
"$tessera" run big --accel "$accel" --json --no-profile --cache-dir "$(fresh)" -- $prog | tail -1 >"$work/run-local.json"

# The container baseline, where crun is installed: skopeo copy (from the
# local layout: no network) + umoci unpack + crun run, same program.
c0=$(python3 -c 'import time; print(time.monotonic())'); c1=$c0
if command -v crun >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    rm -rf "$work/pulled" "$work/bundle-crun"
    skopeo copy --quiet "oci:$work/layout:big" "oci:$work/pulled:big"
    umoci unpack --image "$work/pulled:big" "$work/bundle-crun" >/dev/null
    cu=$(python3 -c 'import time; print(time.monotonic())')
    python3 - "$work/bundle-crun/config.json" <<'CFG'
import json, sys
c = json.load(open(sys.argv[1]))
c["process"]["args"] = ["python3", "-c", "print(42)"]
c["process"]["terminal"] = False
# This host mixes cgroup v1 and v2: run without cgroup controllers.
c.get("linux", {}).pop("resources", None)
c.get("linux", {}).pop("cgroupsPath", None)
c["linux"]["namespaces"] = [n for n in c["linux"].get("namespaces", []) if n["type"] != "cgroup"]
c["mounts"] = [m for m in c.get("mounts", []) if m.get("type") != "cgroup"]
json.dump(c, open(sys.argv[1], "w"))
CFG
    if crun --cgroup-manager=disabled run -b "$work/bundle-crun" "tessera-bench-$$" >/dev/null 2>"$work/crun.err"; then
        c1=$(python3 -c 'import time; print(time.monotonic())')
    else
        echo "container baseline: skopeo copy + umoci unpack alone took $(python3 -c "print(round($cu - $c0, 2))") s; then crun does not run on this machine: $(cat "$work/crun.err")"
    fi
    rm -rf "$work/pulled" "$work/bundle-crun"
fi

python3 - "$work" "$t0" "$t1" "$c0" "$c1" <<'PY'
import json, sys
w = sys.argv[1]
download = float(sys.argv[3]) - float(sys.argv[2])
container = float(sys.argv[5]) - float(sys.argv[4])
r = {k: json.load(open(f"{w}/run-{k}.json")) for k in ["lazy", "record", "profiled", "local"]}
disk = r["lazy"]["disk_bytes"]
def first(k): return r[k]["seconds_to_first_output"]
base = download + first("local")
print(f"image: {disk/2**30:.2f} GiB disk; accel {r['lazy']['accel']}; origin 30 ms/request, 100 MiB/s")
print(f"lazy, no profile:   first output at {first('lazy'):.2f} s, fetched {r['lazy']['bytes_fetched']/2**20:.1f} MiB = {100*r['lazy']['bytes_fetched']/disk:.2f}% of the disk (goal <= 6.4%)")
print(f"lazy, with profile: first output at {first('profiled'):.2f} s, fetched {r['profiled']['bytes_fetched']/2**20:.1f} MiB = {100*r['profiled']['bytes_fetched']/disk:.2f}%; profile of {r['profiled']['profile_chunks']} chunks")
print(f"download then boot: {download:.2f} s to fetch every stored chunk + first output at {first('local'):.2f} s from local = {base:.2f} s")
print(f"lazy vs download-then-boot: {base/first('lazy'):.1f}x faster without a profile, {base/first('profiled'):.1f}x with one (goal >= 15x)")
print(f"profiled vs unprofiled first output: {first('lazy')/first('profiled'):.2f}x")
if container > 0:
    print(f"container baseline (skopeo copy from the local layout + umoci unpack + crun run): {container:.2f} s; "
          f"lazy microVM vs it: {container/first('lazy'):.2f}x without a profile, {container/first('profiled'):.2f}x with one")
PY
