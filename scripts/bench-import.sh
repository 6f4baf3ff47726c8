#!/bin/sh
# Import benchmarks of docs/BENCHMARKS.md. Builds (and caches) a >1 GiB image:
# Debian minbase + python3 (debootstrap), a layer with this machine's
# /usr/lib/x86_64-linux-gnu and /usr/share, and a variant with one more small
# layer. Then, each in a fresh TESSERA_HOME:
#   - import throughput vs sealing the same bytes alone (`tessera bench seal`),
#     gzip layers (as umoci writes them) and uncompressed layers;
#   - peak RSS of the import;
#   - re-importing the unchanged image (new chunks must be 0);
#   - the image with one more layer of S bytes (new chunks vs S).
# Usage: scripts/bench-import.sh [WORKDIR]   (default /var/tmp/tessera-bench)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench}
mkdir -p "$work"
cargo build --release --quiet
tessera="$repo/target/release/tessera"

if [ ! -f "$work/layout/index.json" ] || ! grep -q '"plus"' "$work/layout/index.json"; then
    echo "building the benchmark image in $work/layout (debootstrap; a few minutes)" >&2
    sh scripts/minbase-image.sh "$work/layout" python3-minimal
    rm -rf "$work/bundle"
    umoci unpack --image "$work/layout:minbase" "$work/bundle" >/dev/null
    mkdir -p "$work/bundle/rootfs/opt/big"
    cp -a /usr/lib/x86_64-linux-gnu /usr/share "$work/bundle/rootfs/opt/big/"
    umoci repack --image "$work/layout:big" "$work/bundle"
    head -c 3145728 /dev/urandom > "$work/bundle/rootfs/opt/small-layer.bin"
    umoci repack --image "$work/layout:plus" "$work/bundle"
    rm -rf "$work/bundle"
fi
[ -f "$work/plain/index.json" ] || python3 scripts/oci-decompress.py "$work/layout" "$work/plain" big

rss_of() { awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$1"; }
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

# Stores to import into: this disk, and (as root) a tmpfs, which shows the
# pipeline's own speed where the disk's write speed would otherwise bound it.
targets="disk:$work"
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$work/tmpfs"
    mountpoint -q "$work/tmpfs" || mount -t tmpfs -o size=8G tmpfs "$work/tmpfs"
    targets="$targets tmpfs:$work/tmpfs"
fi

# The baseline: sealing the same bytes alone, and the disk's write speed.
home="$work/home-baseline"
rm -rf "$home"
TESSERA_HOME="$home" "$tessera" import "oci:$work/layout:big" --name big --json >/dev/null
TESSERA_HOME="$home" "$tessera" export big "$work/big.raw" >/dev/null
"$tessera" bench seal "$work/big.raw" >"$work/seal.json"
rm -rf "$home"
dd if="$work/big.raw" of="$work/dd.out" bs=1M conv=fdatasync 2>"$work/dd.txt"
rm -f "$work/big.raw" "$work/dd.out"
echo "baseline: seal alone $(json "$work/seal.json" seconds) s for $(json "$work/seal.json" bytes) bytes on $(json "$work/seal.json" threads) threads ($(json "$work/seal.json" mib_per_second | cut -c1-6) MiB/s); disk write: $(tail -1 "$work/dd.txt")"

for variant in gzip:layout plain:plain; do
    for target in $targets; do
        label=${variant%%:*}
        where=${target%%:*}
        home="${target#*:}/home-$label"
        rm -rf "$home"
        sync
        TESSERA_HOME="$home" /usr/bin/time -v "$tessera" import "oci:$work/${variant#*:}:big" --name big --json \
            >"$work/import-$label-$where.json" 2>"$work/time-$label-$where.txt"
        [ "$where" = disk ] || rm -rf "$home"
        python3 - "$label layers into $where" "$work/import-$label-$where.json" "$work/seal.json" "$(rss_of "$work/time-$label-$where.txt")" <<'PY'
import json, sys
label, imp, seal, rss = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), int(sys.argv[4])
mib = seal["bytes"] / 2**20
print(f"{label}: import {imp['seconds']:.2f} s = {mib/imp['seconds']:.0f} MiB/s of non-hole chunks; "
      f"ratio to seal alone {seal['seconds']/imp['seconds']:.2f} (goal >= 0.8); "
      f"peak RSS {rss/1024:.0f} MiB for a {imp['disk_bytes']/2**30:.2f} GiB disk")
PY
    done
done

home="$work/home-gzip"
TESSERA_HOME="$home" "$tessera" import "oci:$work/layout:big" --name big-again --json >"$work/reimport.json"
echo "re-import of the unchanged image: new_chunks=$(json "$work/reimport.json" new_chunks) new_bytes=$(json "$work/reimport.json" new_bytes)"

TESSERA_HOME="$home" "$tessera" import "oci:$work/layout:plus" --name plus --json >"$work/plus.json"
python3 - "$work/plus.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
S = 3145728
chunk = 512 * 1024
bound = -(-S // chunk) + r["disk_bytes"] * 0.02 / chunk
print(f"image + one layer of {S} bytes: new_chunks={r['new_chunks']} ({r['new_bytes']/2**20:.1f} MiB); "
      f"bound ceil(S/chunk) + 2% of disk = {bound:.1f} chunks -> {'ok' if r['new_chunks'] <= bound else 'MISSED'}")
PY
