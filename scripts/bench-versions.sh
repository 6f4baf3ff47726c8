#!/bin/sh
# Version benchmarks of docs/BENCHMARKS.md (issue 11): what a new version of
# an image costs the chunk store.
#   1. A base (Debian minbase + python3, one layer) and an app layer v1, then
#      v2..v10, each replacing the app layer with S bytes of changed files
#      (S = 3 MiB and 30 MiB) and a small script in /usr/local/bin (a base
#      directory). All versions go into one store; we report the new chunks
#      of each, and the same count for `mke2fs -d` of the same trees (512 KiB
#      chunks of the raw filesystem, deduplicated by content).
#   2. The same app on a rebuilt base, where one base package (python3.11's
#      interpreter and its library) has changed: new bytes / changed bytes.
# Usage: scripts/bench-versions.sh [WORKDIR]   (default /var/tmp/tessera-bench)
#        SIZES="3145728" limits the app sizes (SIZES="" runs only part 2).
# Needs root (umoci unpack keeps owners), umoci, e2fsprogs, debootstrap.
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench}
v=$work/versions
cargo build --release --quiet
tessera="$repo/target/release/tessera"
mkdir -p "$v"
export E2FSPROGS_FAKE_TIME=1600000000
uuid=6f1d2c4e-8a55-4b1c-9e7a-3c2d1b0a9f88

if [ ! -f "$v/base.ok" ]; then
    echo "building the base images in $v (debootstrap; a few minutes)" >&2
    [ -f "$work/layout/index.json" ] && grep -q '"minbase"' "$work/layout/index.json" || sh scripts/minbase-image.sh "$work/layout" python3-minimal
    rm -rf "$v/layout" "$v/bundle" "$v/rootfs" "$v/changed.txt"
    umoci unpack --image "$work/layout:minbase" "$v/bundle" >/dev/null
    mv "$v/bundle/rootfs" "$v/rootfs"
    rm -rf "$v/bundle"
    umoci init --layout "$v/layout"
    # One base layer from the tree, and one from the same tree with one
    # package rebuilt: its files rewritten whole, each 100 bytes longer.
    for base in base rebuilt; do
        umoci new --image "$v/layout:$base"
        umoci unpack --image "$v/layout:$base" "$v/bundle" >/dev/null
        rmdir "$v/bundle/rootfs"
        cp -a "$v/rootfs" "$v/bundle/rootfs"
        if [ "$base" = rebuilt ]; then
            for f in $(ls "$v/bundle/rootfs/usr/bin/python3."* "$v/bundle/rootfs/usr/lib/python3."*/*.py | head -40); do
                [ -f "$f" ] && [ ! -L "$f" ] || continue
                python3 -c 'import os, random, sys; n = os.path.getsize(sys.argv[1]) + 100; open(sys.argv[1], "wb").write(random.Random(sys.argv[1]).randbytes(n))' "$f"
                echo "$f" >>"$v/changed.txt"
            done
        fi
        umoci repack --image "$v/layout:$base" "$v/bundle"
        rm -rf "$v/bundle"
    done
    touch "$v/base.ok"
fi

# App versions: S bytes of files in /app (from a seeded generator, so the
# same seed gives the same app), and /usr/local/bin/app.
app() { # BASE TAG S SEED
    rm -rf "$v/bundle"
    umoci unpack --image "$v/layout:$1" "$v/bundle" >/dev/null
    mkdir -p "$v/bundle/rootfs/app"
    left=$3 n=0
    while [ "$left" -gt 0 ]; do
        size=$((left < 262144 ? left : 262144))
        python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(sys.argv[1]).randbytes(int(sys.argv[2])))' "$4-$n" "$size" \
            >"$v/bundle/rootfs/app/part-$n.bin"
        left=$((left - size)) n=$((n + 1))
    done
    printf '#!/bin/sh\necho app %s\n' "$4" >"$v/bundle/rootfs/usr/local/bin/app"
    chmod 755 "$v/bundle/rootfs/usr/local/bin/app"
    umoci repack --image "$v/layout:$2" "$v/bundle"
    rm -rf "$v/bundle"
}

# New 512 KiB chunks of a raw filesystem image, against every image seen before.
cat >"$v/chunks.py" <<'PY'
import hashlib, json, os, sys
image, seen_file = sys.argv[1], sys.argv[2]
seen = set(json.load(open(seen_file))) if os.path.exists(seen_file) else set()
new = 0
with open(image, "rb") as f:
    while True:
        c = f.read(512 * 1024)
        if not c:
            break
        if c.count(0) == len(c):
            continue
        h = hashlib.sha256(c).hexdigest()
        if h not in seen:
            seen.add(h)
            new += 1
json.dump(sorted(seen), open(seen_file, "w"))
print(new)
PY

mkfs_new() { # TAG SEEN
    rm -rf "$v/bundle" "$v/mkfs.img"
    umoci unpack --image "$v/layout:$1" "$v/bundle" >/dev/null
    mke2fs -q -F -t ext4 -b 4096 -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0" -d "$v/bundle/rootfs" "$v/mkfs.img" 2G >/dev/null
    python3 "$v/chunks.py" "$v/mkfs.img" "$2"
    rm -rf "$v/bundle" "$v/mkfs.img"
}

json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

for S in ${SIZES-3145728 31457280}; do
    home="$v/home-$S"
    rm -rf "$home" "$v/seen-$S.json"
    echo "S = $((S / 1048576)) MiB: version, Tessera new chunks (data + metadata), new bytes / S, mke2fs -d new chunks, their bytes / S"
    for i in 1 2 3 4 5 6 7 8 9 10; do
        app base "app-$S-v$i" "$S" "$i"
        TESSERA_HOME="$home" "$tessera" import "oci:$v/layout:app-$S-v$i" --name "app-v$i" --json >"$v/import-$S-v$i.json"
        m=$(mkfs_new "app-$S-v$i" "$v/seen-$S.json")
        python3 - "$v/import-$S-v$i.json" "$S" "$i" "$m" <<'PY'
import json, sys
r, S, i, m = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = 512 * 1024
meta = r["new_metadata_chunks"]
print(f"v{i}: tessera {r['new_chunks']} ({r['new_chunks'] - meta} + {meta}) = {r['new_chunks'] * c / S:.2f}x S raw, "
      f"{r['new_bytes'] / S:.2f}x S stored; mke2fs -d {m} = {m * c / S:.2f}x S")
PY
    done
done

# The same app (v1, 3 MiB) on the rebuilt base, after the original.
changed=$(cat "$v/changed.txt" | sed "s|^$v/bundle/rootfs||" | while read -r f; do stat -c %s "$v/rootfs$f"; done | awk '{s += $1 + 100} END {print s}')
home="$v/home-rebuilt"
rm -rf "$home" "$v/seen-rebuilt.json"
app base app-original 3145728 1
app rebuilt app-rebuilt 3145728 1
TESSERA_HOME="$home" "$tessera" import "oci:$v/layout:app-original" --name app --json >/dev/null
mkfs_new app-original "$v/seen-rebuilt.json" >/dev/null
TESSERA_HOME="$home" "$tessera" import "oci:$v/layout:app-rebuilt" --name app-rebuilt --json >"$v/import-rebuilt.json"
m=$(mkfs_new app-rebuilt "$v/seen-rebuilt.json")
python3 - "$v/import-rebuilt.json" "$changed" "$m" <<'PY'
import json, sys
r, changed, m = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
c = 512 * 1024
print(f"rebuilt base ({changed} bytes of changed files; the app layer's files unchanged): tessera {r['new_chunks']} new chunks "
      f"= {r['new_chunks'] * c / changed:.1f}x the changed bytes ({r['new_bytes'] / changed:.1f}x stored); mke2fs -d {m} = {m * c / changed:.1f}x")
PY
