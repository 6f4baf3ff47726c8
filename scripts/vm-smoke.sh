#!/bin/sh
# Groundwork for `tessera run` (issue 5): boots an imported image as the root
# disk of a QEMU microVM under TCG, over the agent's NBD export NAME@LABEL,
# and runs one shell command in it. Proves the path the run command will
# automate: a stock Debian cloud kernel, an initramfs of busybox-static and
# the virtio modules, the program's stdout/stderr/exit code on their own
# serial ports, power-off at the end.
#   scripts/vm-smoke.sh NAME 'cat /etc/os-release'
# Needs: busybox-static, qemu-system-x86 (install it together with qemu-utils
# in one apt-get command), a running `tessera serve` on the default socket.
set -eu
name=$1
cmd=$2
home=${TESSERA_HOME:-$HOME/.local/share/tessera}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The guest kernel, from the Debian package, kept off the host's /boot.
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
apt-get download "$pkg" >/dev/null
dpkg-deb -x ./*.deb k
kernel=$(ls k/boot/vmlinuz-*)

# The initramfs: busybox, the virtio modules (in load order), /init.
mkdir -p ir/bin ir/lib/modules ir/proc ir/sys ir/dev ir/newroot
cp /bin/busybox ir/bin/
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
for m in $mods; do cp "$(find k/lib/modules -name "$m.ko")" ir/lib/modules/; done
cat > ir/init <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $mods; do insmod /lib/modules/\$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 1000 ]; do sleep 0.01; i=\$((i+1)); done
mount -t ext4 /dev/vda /newroot || { echo "exit 125" > /dev/ttyS3; poweroff -f; }
for d in proc sys dev; do mkdir -p /newroot/\$d; done
mount -t proc proc /newroot/proc; mount -t devtmpfs dev /newroot/dev; mount -t sysfs sys /newroot/sys
chroot /newroot /bin/sh -c '$cmd' > /dev/ttyS1 2> /dev/ttyS2
echo "exit \$?" > /dev/ttyS3
sync
poweroff -f
INIT
chmod +x ir/init
(cd ir && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz)

label="smoke$$"
time qemu-system-x86_64 -accel tcg -M q35 -m 256 -smp 1 -nographic -no-reboot -nodefaults \
    -kernel "$kernel" -initrd initrd.gz -append "console=ttyS0 panic=-1 quiet" \
    -drive "file=nbd+unix:///$name@$label?socket=$home/nbd.sock,format=raw,if=none,id=root,cache=none" \
    -device virtio-blk-pci,drive=root \
    -serial file:console.log -serial file:out.txt -serial file:err.txt -serial file:ctl.txt
echo "--- stdout"; cat out.txt
echo "--- stderr"; cat err.txt
echo "--- $(cat ctl.txt)"
rm -rf "$home/cache/overlays/$name@$label"
