#!/bin/sh
# Transport-security benchmarks of docs/BENCHMARKS.md, same run, on loopback:
#   - warm sequential NBD read (nbdcopy, best of 3) and 4 KiB random read p50
#     (`tessera bench nbd-latency`), tessera serve with TLS vs without, and
#     qemu-nbd with --tls-creds vs without on the same image (goal: TLS costs
#     tessera <= 15% throughput, and no more than it costs qemu-nbd);
#   - cache-tier chunk reads (`tessera bench tier`), HTTP/2 over TLS vs h2c,
#     five nodes, 4+1.
# Certificates are made with openssl. Image: busybox and 512 MiB of random data.
# Usage: scripts/bench-tls.sh [WORKDIR]   (default /var/tmp/tessera-bench-tls)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-/var/tmp/tessera-bench-tls}
mkdir -p "$work"
sh scripts/ensure-packages.sh umoci busybox-static libnbd-bin qemu-utils openssl python3
cargo build --release --quiet
tessera="$repo/target/release/tessera"
export TESSERA_HOME="$work/home"
now() { python3 -c 'import time; print(time.monotonic())'; }
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

certs="$work/certs"
if [ ! -f "$certs/client/client-key.pem" ]; then
    mkdir -p "$certs/client" "$certs/server"
    (
        cd "$certs"
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 -sha256 \
            -subj "/O=bench/CN=bench CA" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        leaf() {
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1-key.pem" -out "$1.csr" -subj "$2" 2>/dev/null
            printf '%s\n' "$3" > "$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 -sha256 -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
        }
        leaf server "/O=bench/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
        leaf client "/O=bench/CN=client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
        cp ca-cert.pem client-cert.pem client-key.pem client/
        cp ca-cert.pem server-cert.pem server-key.pem server/
    )
fi

if [ ! -f "$TESSERA_HOME/images/big.json" ]; then
    rm -rf "$work/layout" "$work/bundle"
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:big" >/dev/null
    umoci unpack --rootless --image "$work/layout:big" "$work/bundle" >/dev/null
    mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/data"
    cp /bin/busybox "$work/bundle/rootfs/bin/"
    head -c 536870912 /dev/urandom > "$work/bundle/rootfs/data/blob"
    umoci repack --image "$work/layout:big" "$work/bundle" >/dev/null
    rm -rf "$work/bundle"
    "$tessera" import "oci:$work/layout:big" --name big --headroom 64MiB >/dev/null
fi
"$tessera" export big "$work/big.raw" >/dev/null

# start NAME ARGS...: a server whose ready file tells its TCP address; sets $addr and $spid.
start_tessera() {
    name=$1; shift
    rm -rf "$work/cache-$name" "$work/$name.ready"
    "$tessera" serve --nbd 127.0.0.1:0 --nbd "unix:$work/$name.sock" --cache-dir "$work/cache-$name" --cache-mem 2GiB --ready-file "$work/$name.ready" "$@" 2>/dev/null &
    spid=$!; pids="$pids $spid"
    i=0; until [ -s "$work/$name.ready" ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1; sleep 0.05; done
    addr=$(python3 -c "import json,sys; print([a for a in json.load(open(sys.argv[1]))['nbd'] if not a.startswith('unix:')][0])" "$work/$name.ready")
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
seqread() { # URI -> seconds, best of 3 warm runs
    nbdcopy "$1" null:
    best=""
    for _ in 1 2 3; do
        t0=$(now); nbdcopy "$1" null:; t1=$(now)
        best=$(python3 -c "import sys; a=float(sys.argv[1])-float(sys.argv[2]); b=sys.argv[3]; print(a if b=='' or a<float(b) else b)" "$t1" "$t0" "$best")
    done
    echo "$best"
}
lat() { "$tessera" bench nbd-latency --export big --count 20000 "$@" | python3 -c "import json,sys; print(json.load(sys.stdin)['p50_us'])"; }
tlsargs="--tls-ca $certs/ca-cert.pem --tls-cert $certs/client-cert.pem --tls-key $certs/client-key.pem"

start_tessera plain
t_plain_seq=$(seqread "nbd://$addr/big"); t_plain_lat=$(lat --tcp "$addr")
kill $spid; wait $spid 2>/dev/null || true
start_tessera tls --tls-cert "$certs/server-cert.pem" --tls-key "$certs/server-key.pem" --tls-client-ca "$certs/ca-cert.pem"
# shellcheck disable=SC2086
t_tls_seq=$(seqread "nbds://$addr/big?tls-certificates=$certs/client"); t_tls_lat=$(lat --tcp "$addr" $tlsargs)
kill $spid; wait $spid 2>/dev/null || true

# qemu-nbd binds a port it is given; this one is free when asked (a benchmark, not a test).
port=$(free_port)
qemu-nbd -t -r -f raw -x big --bind 127.0.0.1 -p "$port" "$work/big.raw" & qpid=$!; pids="$pids $qpid"; sleep 1
q_plain_seq=$(seqread "nbd://127.0.0.1:$port/big"); q_plain_lat=$(lat --tcp "127.0.0.1:$port")
kill $qpid; wait $qpid 2>/dev/null || true
port=$(free_port)
qemu-nbd -t -r -f raw -x big --bind 127.0.0.1 -p "$port" --object "tls-creds-x509,id=tls0,dir=$certs/server,endpoint=server" --tls-creds tls0 "$work/big.raw" &
qpid=$!; pids="$pids $qpid"; sleep 1
# shellcheck disable=SC2086
q_tls_seq=$(seqread "nbds://localhost:$port/big?tls-certificates=$certs/client"); q_tls_lat=$(lat --tcp "127.0.0.1:$port" $tlsargs)
kill $qpid; wait $qpid 2>/dev/null || true

# The cache tier: five nodes in clear, five over TLS; the same reads of each.
nodes() { # NAME ARGS...: five cache nodes; sets $list to their addresses
    name=$1; shift
    list=""
    for i in 1 2 3 4 5; do
        rm -rf "$work/node-$name-$i" "$work/node-$name-$i.ready"
        "$tessera" cachenode --listen 127.0.0.1:0 --dir "$work/node-$name-$i" --ready-file "$work/node-$name-$i.ready" "$@" >/dev/null 2>&1 &
        pids="$pids $!"
        j=0; until [ -s "$work/node-$name-$i.ready" ]; do j=$((j+1)); [ $j -lt 400 ] || exit 1; sleep 0.05; done
        list="$list${list:+,}$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['listen'])" "$work/node-$name-$i.ready")"
    done
}
nodes plain; plain_nodes=$list
nodes tls --tls-cert "$certs/server-cert.pem" --tls-key "$certs/server-key.pem"; tls_nodes=$list
"$tessera" bench tier big --cache-nodes "$plain_nodes" --warm --count 2000 --origin-reads 10 >"$work/tier-plain.json"
"$tessera" bench tier big --cache-nodes "$tls_nodes" --cache-tls-ca "$certs/ca-cert.pem" --warm --count 2000 --origin-reads 10 >"$work/tier-tls.json"

python3 - "$work" "$t_plain_seq" "$t_tls_seq" "$t_plain_lat" "$t_tls_lat" "$q_plain_seq" "$q_tls_seq" "$q_plain_lat" "$q_tls_lat" <<'PY'
import json, os, sys
w = sys.argv[1]
tp, tt, lp, lt, qp, qt, qlp, qlt = map(float, sys.argv[2:10])
mib = os.path.getsize(f"{w}/big.raw") / 2**20
print(f"tessera warm sequential: plain {mib/tp:.0f} MiB/s, TLS {mib/tt:.0f} MiB/s -> TLS keeps {tp/tt:.3f} of the throughput (costs {100*(1-tp/tt):.1f}%; goal <= 15%)")
print(f"qemu-nbd warm sequential: plain {mib/qp:.0f} MiB/s, TLS {mib/qt:.0f} MiB/s -> TLS keeps {qp/qt:.3f} (costs {100*(1-qp/qt):.1f}%)")
print(f"4 KiB random p50: tessera plain {lp:.1f} us, TLS {lt:.1f} us ({lt/lp:.2f}x); qemu-nbd plain {qlp:.1f} us, TLS {qlt:.1f} us ({qlt/qlp:.2f}x)")
p, t = json.load(open(f"{w}/tier-plain.json")), json.load(open(f"{w}/tier-tls.json"))
print(f"cache tier chunk read, h2c: p50 {p['first_k']['p50_ms']:.2f} ms, p99 {p['first_k']['p99_ms']:.2f} ms; "
      f"TLS: p50 {t['first_k']['p50_ms']:.2f} ms, p99 {t['first_k']['p99_ms']:.2f} ms "
      f"({t['first_k']['p50_ms']/p['first_k']['p50_ms']:.2f}x, {t['first_k']['p99_ms']/p['first_k']['p99_ms']:.2f}x)")
PY
rm -f "$work/big.raw"
