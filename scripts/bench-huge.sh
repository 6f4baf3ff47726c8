#!/bin/sh
# The 10 GiB image of docs/BENCHMARKS.md (issue 11): Debian minbase + python3
# (plain layers) and one plain layer of 10 GiB of random data (40 files of
# 256 MiB). Imports it into a tmpfs store (peak RSS), then runs
# `python3 -c print(42)` from it in a VM with an empty cache (bytes fetched).
# Needs about 10 GiB of disk for the layout and 11 GiB of RAM for the store;
# run scripts/bench-run.sh first for the guest kernel it caches.
# Usage: scripts/bench-huge.sh [WORKDIR]   (default /var/tmp/tessera-bench)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench}
h=$work/huge
cargo build --release --quiet
tessera="$repo/target/release/tessera"
[ -f "$work/layout/index.json" ] && grep -q '"minbase"' "$work/layout/index.json" || sh scripts/minbase-image.sh "$work/layout" python3-minimal
export TESSERA_KERNEL_DIR="$work/kernel"

if [ ! -f "$h/layout/index.json" ] || ! grep -q '"huge"' "$h/layout/index.json"; then
    rm -rf "$h/layout"
    mkdir -p "$h"
    python3 scripts/oci-decompress.py "$work/layout" "$h/layout" minbase
    python3 - "$h/layout" <<'PY'
import hashlib, io, json, os, random, sys, tarfile
layout = sys.argv[1]
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
def put(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob(d), "wb") as f:
        f.write(data)
    return d, len(data)
class Hashing(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()
    def writable(self):
        return True
    def write(self, b):
        self.h.update(b)
        return self.f.write(b)
class Random(io.RawIOBase):
    def __init__(self, seed, size):
        self.r, self.left = random.Random(seed), size
    def readable(self):
        return True
    def readinto(self, b):
        n = min(len(b), self.left, 1 << 20)
        b[:n] = self.r.randbytes(n)
        self.left -= n
        return n
index = json.load(open(os.path.join(layout, "index.json")))
desc = index["manifests"][0]
manifest = json.load(open(blob(desc["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))
tmp = os.path.join(layout, "tmp-layer")
with open(tmp, "wb") as raw:
    out = Hashing(raw)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("data")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1600000000
        t.addfile(d)
        for i in range(40):
            info = tarfile.TarInfo(f"data/part-{i:02}.bin")
            info.size, info.mode, info.mtime = 256 << 20, 0o644, 1600000000
            t.addfile(info, io.BufferedReader(Random(i, info.size), 1 << 20))
    digest = "sha256:" + out.h.hexdigest()
os.replace(tmp, blob(digest))
manifest["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": os.path.getsize(blob(digest))})
config["rootfs"]["diff_ids"].append(digest)
config["config"]["Cmd"] = ["/bin/sh"]
cd, cs = put(json.dumps(config).encode())
manifest["config"].update(digest=cd, size=cs)
md, ms = put(json.dumps(manifest).encode())
entry = {"mediaType": desc["mediaType"], "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "huge"}}
json.dump({"schemaVersion": 2, "manifests": [entry]}, open(os.path.join(layout, "index.json"), "w"))
PY
fi

mkdir -p "$h/tmpfs"
mountpoint -q "$h/tmpfs" || mount -t tmpfs -o size=12G tmpfs "$h/tmpfs"
export TESSERA_HOME="$h/tmpfs/home"
rm -rf "$TESSERA_HOME"
/usr/bin/time -v "$tessera" import "oci:$h/layout:huge" --name huge --json >"$h/import.json" 2>"$h/time.txt"
rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$h/time.txt")
rm -rf "$h/cache"
"$tessera" run huge --accel "${ACCEL:-tcg}" --json --no-profile --cache-dir "$h/cache" -- python3 -c 'print(42)' | tail -1 >"$h/run.json"
python3 - "$h/import.json" "$h/run.json" "$rss" <<'PY'
import json, sys
imp, run, rss = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
print(f"import: {imp['seconds']:.1f} s, {imp['file_bytes'] / 2**30:.2f} GiB of files, a {imp['disk_bytes'] / 2**30:.2f} GiB disk; "
      f"peak RSS {rss / 1024:.0f} MiB (goal < 256 MiB)")
print(f"run: exit {run['exit_code']}, fetched {run['bytes_fetched'] / 2**20:.1f} MiB = "
      f"{100 * run['bytes_fetched'] / imp['file_bytes']:.2f}% of the image's file bytes (goal < 1%), "
      f"{100 * run['bytes_fetched'] / imp['disk_bytes']:.2f}% of the disk")
PY
rm -rf "$TESSERA_HOME" "$h/cache"
umount "$h/tmpfs"
