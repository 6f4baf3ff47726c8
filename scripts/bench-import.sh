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
    skopeo copy --quiet --dest-decompress "oci:$work/layout:big" "oci:$work/plain:big"
fi

rss_of() { awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$1"; }
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

for variant in gzip:layout plain:plain; do
    label=${variant%%:*}
    dir=${variant#*:}
    home="$work/home-$label"
    rm -rf "$home"
    sync
    TESSERA_HOME="$home" /usr/bin/time -v "$tessera" import "oci:$work/$dir:big" --name big --json \
        >"$work/import-$label.json" 2>"$work/time-$label.txt"
    TESSERA_HOME="$home" "$tessera" export big "$work/big.raw" >/dev/null
    "$tessera" bench seal "$work/big.raw" >"$work/seal-$label.json"
    rm -f "$work/big.raw"
    imp=$(json "$work/import-$label.json" seconds)
    seal=$(json "$work/seal-$label.json" seconds)
    sealed_bytes=$(json "$work/seal-$label.json" bytes)
    disk=$(json "$work/import-$label.json" disk_bytes)
    rss=$(rss_of "$work/time-$label.txt")
    python3 - "$label" "$imp" "$seal" "$sealed_bytes" "$disk" "$rss" <<'PY'
import sys
label, imp, seal, sealed, disk, rss = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
mib = sealed / 2**20
print(f"{label} layers: disk {disk/2**30:.2f} GiB, {mib:.0f} MiB of non-hole chunks")
print(f"  import     {imp:7.2f} s  {mib/imp:8.1f} MiB/s")
print(f"  seal alone {seal:7.2f} s  {mib/seal:8.1f} MiB/s")
print(f"  ratio import/seal-alone throughput: {seal/imp:.2f}  (goal >= 0.8)")
print(f"  peak RSS of import: {rss/1024:.0f} MiB  ({rss*1024/disk*100:.1f}% of the disk)")
PY
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
