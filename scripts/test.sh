#!/bin/sh
# Runs Tessera's whole test suite on a Debian 12 machine, installing what it
# needs first: the Debian packages that give the tests real peers, and
# cargo-nextest if it is missing.
set -eu
cd "$(dirname "$0")/.."

packages="umoci skopeo docker-registry debootstrap busybox-static e2fsprogs attr fuse3 libnbd-bin qemu-utils util-linux python3 openssl"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # Debian's docker-registry service listens on all interfaces; the tests
    # start their own, on loopback.
    $sudo_cmd systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# QEMU for `tessera run`. It must come with a matching qemu-utils: where the
# machine has another qemu-utils (a backport), take the distribution's pair.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils >/dev/null 2>&1; then
        version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends --allow-downgrades \
            qemu-system-x86 "qemu-utils=$version" qemu-block-extra- >/dev/null
    fi
fi

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    exec cargo test --workspace --no-fail-fast "$@"
fi
