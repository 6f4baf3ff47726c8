#!/bin/sh
# Runs Tessera's whole test suite on a Debian 12 machine, installing what it
# needs first: the Debian packages that give the tests real peers (QEMU
# included); it uses cargo-nextest where it is installed, cargo test otherwise.
#
#   sh scripts/test.sh            the suite
#   sh scripts/test.sh --soak     the long soak instead (30 minutes of mixed
#                                 NBD clients against one agent;
#                                 TESSERA_SOAK_SECONDS changes the length)
set -eu
cd "$(dirname "$0")/.."

soak=""
if [ "${1:-}" = "--soak" ]; then
    soak=1
    shift
fi

sh scripts/ensure-packages.sh umoci skopeo docker-registry debootstrap busybox-static e2fsprogs attr \
    fuse3 libnbd-bin qemu-utils qemu-system-x86 util-linux python3 openssl iproute2
# moto's S3 server for the S3 tests (they start their own, on loopback), in
# a venv of the checkout's own.
venv=target/test-venv
if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv" 2>/dev/null || { sh scripts/ensure-packages.sh python3-venv; rm -rf "$venv"; python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5.2.1'
fi
TESSERA_MOTO_SERVER="$(pwd)/$venv/bin/moto_server"
export TESSERA_MOTO_SERVER

# Debian's docker-registry service listens on all interfaces; the tests start
# their own, on loopback.
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
$sudo_cmd systemctl disable --now docker-registry >/dev/null 2>&1 || true

# The guest kernel the VM tests boot on microvm (built once, cached beside
# Debian's kernel in the tests' kernel directory), built while clippy runs.
mkdir -p target/tmp
sh scripts/guest-kernel.sh "$(pwd)/target/tmp/kernel" >target/guest-kernel.log 2>&1 &
kernel_build=$!

# The declared checks are enforced: formatting, and clippy (which denies
# undocumented unsafe blocks) with every warning an error.
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add clippy rustfmt
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
wait "$kernel_build" || { tail -30 target/guest-kernel.log >&2; echo "building the guest kernel failed" >&2; exit 1; }

if [ -n "$soak" ]; then
    exec cargo test --release -p tessera-cli --test hardening -- --ignored --exact soak --nocapture "$@"
fi
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    exec cargo test --workspace --no-fail-fast "$@"
fi
