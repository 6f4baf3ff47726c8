#!/bin/sh
# Compressed chunks (issue 17, part 1), docs/BENCHMARKS.md: on the image of
# scripts/bench-import.sh (Debian minbase + python3 + 1.3 GB of this
# machine's libraries and /usr/share, gzip layers as umoci writes them):
#   - bytes stored by Tessera vs the registry's compressed layers
#   - import time and throughput with compressed chunks vs a build from
#     before them (BASE_TESSERA: its binary), the same layout, same run
#   - for one cold `tessera run` of python3 (origin throttle 30 ms, 100 MiB/s):
#     bytes fetched from the origin (sealed) and time to the first output
# Usage: BASE_TESSERA=/path/to/old/tessera scripts/bench-compress.sh [WORKDIR]
set -eu
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/tessera-bench}
[ -f "$work/layout/index.json" ] || { echo "run scripts/bench-import.sh first" >&2; exit 1; }
cargo build --release --quiet
tessera="$(pwd)/target/release/tessera"
base=${BASE_TESSERA:-}
now() { python3 -c 'import time; print(time.monotonic())'; }
# Bytes of the sealed chunks under a directory (a store's or a disk cache's
# chunks/XX/ID files).
stored() { find "$1" -type f -regex '.*/chunks/[0-9a-f][0-9a-f]/[0-9a-f]*' -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

registry=$(python3 - "$work/layout" <<'PY'
import json, sys
d = sys.argv[1]
index = json.load(open(f"{d}/index.json"))
desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "big")
manifest = json.load(open(f"{d}/blobs/sha256/{desc['digest'].split(':')[1]}"))
print(sum(l["size"] for l in manifest["layers"]))
PY
)
echo "registry: compressed layers of big: $registry bytes"

import_with() { # BINARY HOME
    rm -rf "$2"
    t0=$(now)
    TESSERA_HOME="$2" "$1" import "oci:$work/layout:big" --name big --json >"$2.json"
    t1=$(now)
    echo "$(python3 -c "print(round($t1 - $t0, 2))") $(stored "$2")"
}
if [ -n "$base" ]; then
    set -- $(import_with "$base" "$work/home-base")
    echo "before (whole chunks): import $1 s, stored $2 bytes = $(python3 -c "print(round($2 / $registry, 3))")x the registry's"
    base_s=$1
fi
set -- $(import_with "$tessera" "$work/home-zstd")
echo "after (compressed chunks): import $1 s, stored $2 bytes = $(python3 -c "print(round($2 / $registry, 3))")x the registry's"
[ -n "$base" ] && echo "import throughput after / before: $(python3 -c "print(round($base_s / $1, 3))")"

# One cold start through the throttle: sealed bytes from the origin.
run_cold() { # BINARY HOME
    rm -rf "$work/cache-compress"
    TESSERA_HOME="$2" "$1" run big --accel tcg --json --no-profile --origin-latency 30ms --origin-bandwidth 100MiB \
        --cache-dir "$work/cache-compress" -- python3 -c 'print(42)' | tail -1
}
for which in base zstd; do
    if [ "$which" = base ]; then [ -n "$base" ] || continue; bin=$base; else bin=$tessera; fi
    run_cold "$bin" "$work/home-$which" >"$work/run-$which.json"
    # Sealed bytes that left the store: the chunk files the run's cache holds.
    echo "$which: $(python3 -c "import json; r=json.load(open('$work/run-$which.json')); print('first output', round(r['seconds_to_first_output'], 2), 's; chunks from the origin', r['chunks_fetched']['origin'])"); sealed bytes fetched $(stored "$work/cache-compress")"
done
