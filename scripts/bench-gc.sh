#!/bin/sh
# Lifecycle benchmarks of docs/BENCHMARKS.md (issue 13), same run:
#   - dedup ratio of 10 versions of an app over one base: one tenant; two
#     tenants in the global scope and in the tenant scope; the next 10
#     versions imported with and without a salt rotation before them;
#   - disk reclaimed by `rm` + `gc` on a store of 20 images (goal: 100% of
#     the chunks no live image uses);
#   - `gc` time on the local store (20 images, 10 removed) and time and
#     requests per live chunk on S3 (moto_server on loopback, 24 images, 4
#     removed, 20 live; requests counted from moto's own log).
# Images: busybox and a 64 MiB "runtime" layer (the base), plus per version
# an app layer of 4 MiB of its own. Needs umoci, busybox-static, and
# moto_server (scripts/test.sh installs it in target/test-venv).
# Usage: scripts/bench-gc.sh [WORKDIR]   (default /var/tmp/tessera-bench-gc)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench-gc}
mkdir -p "$work"
moto=${TESSERA_MOTO_SERVER:-$repo/target/test-venv/bin/moto_server}
[ -x "$moto" ] || moto=$(command -v moto_server) || { echo "moto_server is missing: run scripts/test.sh once, or pip install 'moto[server]'" >&2; exit 1; }
sh scripts/ensure-packages.sh umoci busybox-static python3 curl
cargo build --release --quiet
export TESSERA_BIN="$repo/target/release/tessera"

if [ ! -f "$work/layout/ready" ]; then
    rm -rf "$work/layout" "$work/bundle"
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:base" >/dev/null
    umoci unpack --rootless --image "$work/layout:base" "$work/bundle" >/dev/null
    mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/runtime"
    cp /bin/busybox "$work/bundle/rootfs/bin/"
    head -c 67108864 /dev/urandom > "$work/bundle/rootfs/runtime/lib"
    umoci repack --image "$work/layout:base" "$work/bundle" >/dev/null
    rm -rf "$work/bundle"
    for v in $(seq 1 20); do
        umoci unpack --rootless --image "$work/layout:base" "$work/bundle" >/dev/null
        mkdir -p "$work/bundle/rootfs/app"
        head -c 4194304 /dev/urandom > "$work/bundle/rootfs/app/app.bin"
        echo "version $v" > "$work/bundle/rootfs/app/VERSION"
        umoci repack --image "$work/layout:v$v" "$work/bundle" >/dev/null
        rm -rf "$work/bundle"
    done
    touch "$work/layout/ready"
fi

rm -f "$work/moto.log"
"$moto" -H 127.0.0.1 -p 0 >"$work/moto.log" 2>&1 &
motopid=$!
trap 'kill $motopid 2>/dev/null || true' EXIT
i=0; until grep -q "Running on http://" "$work/moto.log"; do i=$((i+1)); [ $i -lt 200 ] || exit 1; sleep 0.05; done
addr=$(grep -o "Running on http://[0-9.:]*" "$work/moto.log" | head -1 | sed 's|Running on http://||')
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret

python3 - "$work" "$addr" <<'PY'
import json, os, re, subprocess, sys, time, urllib.request

work, addr = sys.argv[1], sys.argv[2]
tessera = os.environ["TESSERA_BIN"]
layout = f"{work}/layout"
GC = ["gc", "--json", "--grace", "0s", "--lease", "0s", "--rotate-after", "0s"]

def t(home, *args, store=None):
    env = dict(os.environ, TESSERA_HOME=home)
    if store:
        env["TESSERA_STORE"] = store
    out = subprocess.run([tessera, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"tessera {args}: {out.stderr}")
    return out.stdout

def fresh(name):
    home = f"{work}/{name}"
    subprocess.run(["rm", "-rf", home], check=True)
    return home

def imp(home, v, name, *extra, store=None):
    return json.loads(t(home, "import", f"oci:{layout}:v{v}", "--name", name, "--headroom", "16MiB", "--json", *extra, store=store))

def chunk_files(home):
    out = {}
    for root, _, files in os.walk(home):
        if "/chunks/" in root + "/" and "/.staging" not in root:
            for f in files:
                if len(f) == 64:
                    out[f] = os.path.getsize(os.path.join(root, f))
    return out

def refs(home, name):
    r = json.load(open(f"{home}/images/{name}.json"))
    g = r.get("generation", 0)
    d = home if g == 0 else f"{home}/gen/{g}"
    b = open(f"{d}/manifests/{r['manifest']}.refs", "rb").read()
    body = b[len(b"tessera refs 1\n"):-32]
    return {body[i:i + 32].hex() for i in range(0, len(body), 32)}

def stored(report):
    return report["chunks"] - report["holes"]

MIB = 2**20
print("## dedup of 10 versions of an app over one base (local store)")
home = fresh("one-tenant")
logical = sum(stored(imp(home, v, f"v{v}")) for v in range(1, 11))
unique = len(chunk_files(home))
print(f"one tenant: {logical} chunks named, {unique} stored: ratio {logical / unique:.2f}")

for scope in ["global", "tenant"]:
    home = fresh(f"two-tenants-{scope}")
    logical = 0
    for tenant in ["acme", "globex"]:
        logical += sum(stored(imp(home, v, f"{tenant}-v{v}", "--tenant", tenant, "--dedup-scope", scope)) for v in range(1, 11))
    files = chunk_files(home)
    print(f"two tenants x 10 versions, {scope} scope: {logical} chunks named, {len(files)} stored ({sum(files.values()) / MIB:.0f} MiB): ratio {logical / len(files):.2f}")

for rotate in [False, True]:
    home = fresh(f"rotation-{rotate}")
    for v in range(1, 11):
        imp(home, v, f"v{v}")
    if rotate:
        assert json.loads(t(home, *GC))["step"] == "rotated"
    new = [imp(home, v, f"v{v}") for v in range(11, 21)]
    logical = sum(stored(r) for r in new)
    added = sum(r["new_chunks"] for r in new)
    print(f"the next 10 versions, {'after' if rotate else 'without'} a salt rotation: {logical} chunks named, {added} new "
          f"({sum(r['new_bytes'] for r in new) / MIB:.0f} MiB): ratio {logical / added:.2f}")

print()
print("## rm + gc on a store of 20 images (local store)")
home = fresh("reclaim")
for v in range(1, 21):
    imp(home, v, f"v{v}")
before = chunk_files(home)
live_refs = set().union(*(refs(home, f"v{v}") for v in range(11, 21)))
gone_refs = set().union(*(refs(home, f"v{v}") for v in range(1, 11))) - live_refs
t(home, "rm", *[f"v{v}" for v in range(1, 11)])
steps = []
for _ in range(3):
    s = time.monotonic()
    r = json.loads(t(home, *GC))
    r["seconds"] = time.monotonic() - s
    steps.append(r)
after = chunk_files(home)
reclaimed = set(before) - set(after)
print(f"chunks before {len(before)} ({sum(before.values()) / MIB:.0f} MiB), after {len(after)} ({sum(after.values()) / MIB:.0f} MiB)")
print(f"chunks only removed images used: {len(gone_refs)} ({sum(before[c] for c in gone_refs) / MIB:.1f} MiB); reclaimed {len(reclaimed & gone_refs)} of them "
      f"({100 * len(reclaimed & gone_refs) / len(gone_refs):.1f}%); live chunks lost: {len(live_refs - set(after))}; deleted_bytes reported {steps[-1]['deleted_bytes'] / MIB:.1f} MiB")
print("local gc steps: " + "; ".join(f"{s['step']} {s['seconds']:.2f} s" for s in steps) + f"; {len(live_refs)} live chunks")

print()
print("## gc on S3 (moto): 24 images, 4 removed, 20 live")
urllib.request.urlopen(urllib.request.Request(f"http://{addr}/gcbench", method="PUT")).read()
store = f"s3://gcbench/t?endpoint=http://{addr}&region=us-east-1"
home = fresh("s3-home")
for v in range(1, 21):
    imp(home, v, f"v{v}", store=store)
for v in range(1, 5):
    imp(home, v, f"again-v{v}", store=store)
t(home, "rm", *[f"v{v}" for v in range(17, 21)], store=store)
live = None
total = {}
for _ in range(3):
    mark = len(open(f"{work}/moto.log").read().splitlines())
    s = time.monotonic()
    r = json.loads(t(home, *GC, store=store))
    secs = time.monotonic() - s
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(f"{work}/moto.log").read().splitlines()[mark:]]
    counts = {}
    for l in lines:
        if '"' in l and "/gcbench" in l:
            method = l.split('"')[1].split()[0]
            counts[method] = counts.get(method, 0) + 1
    if r["step"] == "migrated":
        live = r["copied_chunks"]
    for k, n in counts.items():
        total[k] = total.get(k, 0) + n
    print(f"{r['step']}: {secs:.2f} s, requests {dict(sorted(counts.items()))}, deleted {r['deleted_chunks']} chunks")
n = sum(total.values())
print(f"whole collection: {n} requests for {live} live chunks: {n / live:.3f} per live chunk ({dict(sorted(total.items()))})")
PY
