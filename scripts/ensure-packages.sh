#!/bin/sh
# Installs the Debian packages named as arguments that are missing.
# qemu-system-x86 is installed with a matching qemu-utils: where the machine
# has another qemu-utils (a backport), the distribution's pair is taken.
set -eu
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
install() { DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }

missing=""
qemu=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
    if [ "$p" = qemu-system-x86 ]; then qemu=1; else missing="$missing $p"; fi
done
[ -n "$missing$qemu" ] || exit 0
echo "installing:$missing${qemu:+ qemu-system-x86}" >&2
$sudo_cmd apt-get update -qq
# shellcheck disable=SC2086
[ -z "$missing" ] || install $missing
if [ -n "$qemu" ] && ! install qemu-system-x86 qemu-utils 2>/dev/null; then
    version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    install --allow-downgrades qemu-system-x86 "qemu-utils=$version" qemu-block-extra-
fi
