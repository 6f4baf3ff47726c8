#!/bin/sh
# Builds the guest kernel `tessera run` boots fastest: Debian's kernel
# sources (linux-source) with a minimal configuration for the job (no
# modules, no ACPI, no firmware probing; virtio-mmio, virtio-blk,
# virtio-console, ext4, serial console, PVH direct boot), as an
# uncompressed ELF `vmlinux`, kept in KERNEL_DIR/tessera-VERSION/.
#   scripts/guest-kernel.sh [KERNEL_DIR]
# KERNEL_DIR defaults to $TESSERA_KERNEL_DIR, else ~/.cache/tessera/kernel,
# the directory `tessera run` looks in. Takes ~10 minutes on 2 cores the
# first time; does nothing when the kernel of this configuration is built.
set -eu
cd "$(dirname "$0")/.."
dir=${1:-${TESSERA_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/kernel}}
config_version=3
sh scripts/ensure-packages.sh linux-source bc flex bison libelf-dev make gcc xz-utils
tarball=$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -1)
version=$(basename "$tarball" .tar.xz | sed 's/^linux-source-//')
out="$dir/tessera-$version-c$config_version"
[ -f "$out/vmlinux" ] && { echo "$out/vmlinux"; exit 0; }
mkdir -p "$dir"
work=$(mktemp -d "$dir/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building the guest kernel from $tarball (first time only)" >&2
tar -xJf "$tarball" -C "$work"
src="$work/linux-source-$version"
cd "$src"
make -s ARCH=x86_64 tinyconfig
on="64BIT SMP X86_MPPARSE PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP
    BINFMT_ELF BINFMT_SCRIPT DEVTMPFS PROC_FS PROC_SYSCTL SYSCTL SYSFS TMPFS SHMEM FUTEX EPOLL
    SIGNALFD TIMERFD EVENTFD AIO FILE_LOCKING MULTIUSER POSIX_TIMERS ADVISE_SYSCALLS MEMBARRIER
    RSEQ INOTIFY_USER FHANDLE SYSVIPC POSIX_MQUEUE BLOCK BLK_DEV EXT4_FS EXT4_USE_FOR_EXT2
    VIRTIO_MENU VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_CONSOLE
    HYPERVISOR_GUEST PARAVIRT PVH NET UNIX NO_HZ_IDLE HIGH_RES_TIMERS
    UNIX98_PTYS DEVPTS_MULTIPLE_INSTANCES"
off="MODULES PCI ACPI INPUT SERIO VT RETPOLINE CPU_MITIGATIONS DEBUG_KERNEL KALLSYMS"
for o in $on; do scripts/config -e "$o"; done
for o in $off; do scripts/config -d "$o"; done
scripts/config --set-val SERIAL_8250_NR_UARTS 4 --set-val SERIAL_8250_RUNTIME_UARTS 4 --set-val NR_CPUS 8
make -s ARCH=x86_64 olddefconfig
for o in VIRTIO_MMIO VIRTIO_BLK VIRTIO_CONSOLE EXT4_FS PVH SERIAL_8250_CONSOLE DEVTMPFS BLK_DEV_INITRD; do
    grep -q "^CONFIG_$o=y" .config || { echo "the kernel configuration lacks CONFIG_$o" >&2; exit 1; }
done
make -s ARCH=x86_64 -j"$(nproc)" vmlinux >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
cp vmlinux .config "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out/vmlinux"
