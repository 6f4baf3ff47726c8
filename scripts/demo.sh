#!/bin/sh
# Tessera's main job on its embedded defaults: build a real OCI image (busybox,
# with umoci), import it into TESSERA_HOME (default ~/.local/share/tessera),
# list, inspect and verify it, then run it in a microVM on its lazy disk.
# Installs what it needs on Debian 12.
set -eu
cd "$(dirname "$0")/.."

sh scripts/ensure-packages.sh umoci busybox-static e2fsprogs qemu-system-x86

cargo build --release --quiet
tessera=./target/release/tessera

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/layout"
umoci new --image "$work/layout:demo"
umoci unpack --rootless --image "$work/layout:demo" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin" "$work/bundle/rootfs/etc"
cp /bin/busybox "$work/bundle/rootfs/bin/busybox"
for applet in sh ls cat echo; do ln -s busybox "$work/bundle/rootfs/bin/$applet"; done
echo "hello from tessera" > "$work/bundle/rootfs/etc/greeting"
umoci repack --image "$work/layout:demo" "$work/bundle"
umoci config --image "$work/layout:demo" --config.entrypoint /bin/cat --config.cmd /etc/greeting

$tessera import "oci:$work/layout:demo" --name demo
$tessera images
$tessera inspect demo
$tessera verify demo

# Boot it: a microVM on the lazy disk runs the entrypoint. The first run
# fetches the guest kernel (Debian's linux-image-cloud-amd64) with apt.
$tessera run demo --report
