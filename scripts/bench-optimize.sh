#!/bin/sh
# Start-up bytes of docs/BENCHMARKS.md (issue 17): Debian bookworm python3
# (debootstrap) + a layer of numpy and pandas wheels from PyPI, entrypoint
# `python3 -c "import numpy, pandas"`. Imports it (stored bytes vs the
# registry's compressed layers), runs it with an empty cache through the
# origin throttle (bytes fetched, time to first output; the run records the
# start-up profile), optimizes it (`tessera optimize`) and runs that the
# same way.
# Usage: scripts/bench-optimize.sh [WORKDIR]   (default /var/tmp/tessera-bench)
# Needs root, umoci, debootstrap, pip (PyPI), qemu; run scripts/bench-run.sh
# first for the guest kernel it caches.
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench}
o=$work/optimize
cargo build --release --quiet
tessera="$repo/target/release/tessera"
export TESSERA_KERNEL_DIR="$work/kernel"
throttle="--origin-latency 30ms --origin-bandwidth 100MiB"
prog='import numpy, pandas; print("ready", numpy.__version__, pandas.__version__)'

if [ ! -f "$o/layout/index.json" ] || ! grep -q '"numpy"' "$o/layout/index.json"; then
    echo "building the image in $o/layout (debootstrap and pip; a few minutes)" >&2
    mkdir -p "$o"
    sh scripts/minbase-image.sh "$o/layout" python3
    rm -rf "$o/bundle"
    umoci unpack --image "$o/layout:minbase" "$o/bundle" >/dev/null
    site="$o/bundle/rootfs/usr/local/lib/python3.11/dist-packages"
    mkdir -p "$site"
    python3 -m pip install --quiet --no-compile --only-binary=:all: --python-version 3.11 \
        --platform manylinux2014_x86_64 --target "$site" numpy pandas
    umoci repack --image "$o/layout:numpy" "$o/bundle"
    umoci config --image "$o/layout:numpy" --config.entrypoint python3 --config.cmd -c --config.cmd "$prog"
    rm -rf "$o/bundle"
fi

export TESSERA_HOME="$o/home"
rm -rf "$TESSERA_HOME"
"$tessera" import "oci:$o/layout:numpy" --name numpy --json >"$o/import.json"
registry=$(python3 - "$o/layout" <<'PY'
import json, os, sys
layout = sys.argv[1]
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
index = json.load(open(os.path.join(layout, "index.json")))
desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "numpy")
print(sum(l["size"] for l in json.load(open(blob(desc["digest"])))["layers"]))
PY
)
stored=$(du -sb "$TESSERA_HOME/chunks" | cut -f1)

runs() { # NAME LABEL
    rm -rf "$o/cache"
    # shellcheck disable=SC2086
    "$tessera" run "$1" --accel "${ACCEL:-tcg}" --json --no-profile $throttle --cache-dir "$o/cache" | tail -1 >"$o/run-$2.json"
}
runs numpy lazy
# The recording run (it keeps the profile; --no-profile above skips both).
rm -rf "$o/cache"
# shellcheck disable=SC2086
"$tessera" run numpy --accel "${ACCEL:-tcg}" --json $throttle --cache-dir "$o/cache" | tail -1 >"$o/run-record.json"
"$tessera" optimize numpy --as numpy-opt --json >"$o/optimize.json"
runs numpy-opt optimized

# Would 64 KiB sub-chunks pay? From the recorded blocks of both profiles:
# the chunks and the 64 KiB pieces of them the start touches.
"$tessera" profile numpy --json >"$o/profile-numpy.json"
"$tessera" profile numpy-opt --json >"$o/profile-opt.json"

python3 - "$o" "$registry" "$stored" <<'PY'
import json, sys
o, registry, stored = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load = lambda n: json.load(open(f"{o}/{n}.json"))
imp, opt = load("import"), load("optimize")
print(f"registry layers {registry / 1e6:.1f} MB; Tessera stores {stored / 1e6:.1f} MB = {stored / registry:.2f}x (goal <= 1.05x)")
print(f"optimize: start chunks {opt['start_chunks_before']} -> {opt['start_chunks_after']}, "
      f"bytes {opt['start_bytes_before'] / 1e6:.1f} MB -> {opt['start_bytes_after'] / 1e6:.1f} MB; {opt['start_files']} files first; {opt['new_chunks']} new chunks")
for label in ["numpy", "opt"]:
    p = load(f"profile-{label}")
    blocks = {b for first, n in p["block_runs"] for b in range(first, first + n)}
    chunks = {b // 128 for b in blocks}
    pieces = {b // 16 for b in blocks}
    print(f"profile {label}: {len(blocks)} blocks read ({len(blocks) * 4096 / 1e6:.1f} MB); "
          f"{len(chunks)} chunks of 512 KiB = {len(chunks) * 524288 / 1e6:.1f} MB, "
          f"{len(pieces)} pieces of 64 KiB = {len(pieces) * 65536 / 1e6:.1f} MB (uncompressed)")
for label in ["lazy", "optimized"]:
    r = load(f"run-{label}")
    print(f"run {label} (empty cache, no prefetch, throttled origin): fetched {r['bytes_fetched'] / 1e6:.1f} MB, "
          f"first output {r['seconds_to_first_output']:.2f} s, exit {r['exit_code']}")
PY
