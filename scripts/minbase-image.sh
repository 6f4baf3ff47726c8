#!/bin/sh
# Builds an OCI image layout of Debian minbase (debootstrap), tagged "minbase",
# plus extra packages given as arguments:  minbase-image.sh LAYOUT_DIR [PKG,...]
# The mirror is read from this machine's apt configuration.
set -eu
out=$1
include=${2:-}
mirror=$(sh "$(dirname "$0")/apt-mirror.sh")
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:minbase"
umoci unpack --image "$out:minbase" "$work/bundle" >/dev/null
rmdir "$work/bundle/rootfs" 2>/dev/null || rm -rf "$work/bundle/rootfs"
debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$work/bundle/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    exit 1
}
rm -rf "$work/bundle/rootfs/var/cache/apt/archives/"*.deb
umoci repack --image "$out:minbase" "$work/bundle"
umoci config --image "$out:minbase" --config.cmd /bin/bash
umoci gc --layout "$out"
