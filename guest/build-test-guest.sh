#!/bin/sh
# Build kvmgate's test guest from Debian packages: a cloud kernel, a busybox-static
# initramfs and a small ext4 data disk. Tests, the demo and the benchmarks share it.
# The result is cached outside the repository and rebuilt only when something is missing.
#
# usage: guest/build-test-guest.sh [CACHE_DIR]      (default /var/cache/kvmgate-test-guest)
# prints the cache directory on success.
set -eu
OUT=${1:-${KVMGATE_GUEST_DIR:-/var/cache/kvmgate-test-guest}}
RECIPE=5  # bump when this script changes what it builds
if [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ]; then
    echo "$OUT"; exit 0
fi

need() { command -v "$1" >/dev/null 2>&1; }
pkgs=""
dpkg -s busybox-static >/dev/null 2>&1 || pkgs="$pkgs busybox-static"
need cpio || pkgs="$pkgs cpio"
need mkfs.ext4 || pkgs="$pkgs e2fsprogs"
need modinfo || pkgs="$pkgs kmod"
need qemu-img || pkgs="$pkgs qemu-utils"
need genisoimage || pkgs="$pkgs genisoimage"
if [ -n "$pkgs" ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The meta package names the current versioned cloud kernel.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
    apt-get update -qq >/dev/null
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
apt-get download "$kpkg" >/dev/null 2>&1 || { chmod 777 "$work"; apt-get download "$kpkg" >/dev/null; }
dpkg-deb -x ./*.deb kernel
kver=$(ls kernel/lib/modules)
moddir=kernel/lib/modules/$kver

# Modules in dependency order: each module's dependencies come first.
order=""
add_mod() {
    case " $order " in *" $1 "*) return ;; esac
    f=$(find "$moddir" -name "$1.ko" | head -n 1)
    [ -n "$f" ] || { echo "module $1 not found in $kpkg" >&2; exit 1; }
    for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
    order="$order $1"
}
for m in virtio_ring virtio virtio_pci virtio_blk virtio_net virtio_balloon virtio_console \
         scsi_mod libata ata_piix sd_mod sr_mod isofs button evdev; do add_mod "$m"; done

mkdir -p root/usr/share/udhcpc root/www root/usr/bin root/usr/sbin root/bin root/sbin root/dev root/proc root/sys root/mnt root/cdrom root/tmp root/lib/modules root/etc
cp /bin/busybox root/bin/busybox
for m in $order; do cp "$(find "$moddir" -name "$m.ko" | head -n 1)" root/lib/modules/; done
echo "$order" > root/lib/modules/order
cat > root/usr/share/udhcpc/default.script <<'DHCP'
#!/bin/sh
# Configure the address QEMU's user-mode DHCP server (or any other) hands out.
case "$1" in
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        [ -n "$router" ] && route add default gw "$router" dev "$interface" 2>/dev/null
        echo "KVMGATE-GUEST-NET $interface $ip" > /dev/console
        ;;
esac
exit 0
DHCP
chmod 755 root/usr/share/udhcpc/default.script
echo "kvmgate-guest-httpd" > root/www/index.html
# An ssh server's greeting, for tests that follow a forwarded ssh port into the guest.
printf '#!/bin/sh\necho SSH-2.0-kvmgate-test-guest\nsleep 2\n' > root/usr/bin/kvmgate-ssh-banner
chmod 755 root/usr/bin/kvmgate-ssh-banner
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
# The ACPI power button powers the guest off, so that "kvmgate stop" is graceful.
for e in /sys/class/input/event*; do
    if [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ]; then
        (dd if=/dev/input/${e##*/} bs=24 count=1 >/dev/null 2>&1 && echo "KVMGATE-GUEST-POWEROFF" && poweroff -f) &
    fi
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/sr0 ] || [ -b /dev/sda ] || [ -b /dev/vda ] && break; sleep 0.1; done
for d in /dev/vda /dev/sda /dev/hda; do
    [ -b $d ] && mount -t ext4 $d /mnt 2>/dev/null && break
done
[ -b /dev/sr0 ] && mount -t iso9660 -o ro /dev/sr0 /cdrom 2>/dev/null
ip link set lo up 2>/dev/null
for n in /sys/class/net/eth*; do
    [ -e "$n" ] || continue
    ip link set "${n##*/}" up
    udhcpc -i "${n##*/}" -q -n -t 5 -T 1 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 &
done
# kvmgate.httpd on the kernel command line: serve /www on port 80 (network tests).
grep -qw kvmgate.httpd /proc/cmdline && httpd -p 80 -h /www
# kvmgate.ssh: answer on port 22 with an ssh greeting (no real sshd in busybox).
grep -qw kvmgate.ssh /proc/cmdline && nc -ll -p 22 -e /usr/bin/kvmgate-ssh-banner &
disk=none; [ -f /mnt/kvmgate-disk ] && disk=$(cat /mnt/kvmgate-disk)
cd=none; [ -f /cdrom/kvmgate-cd ] && cd=$(cat /cdrom/kvmgate-cd)
echo "KVMGATE-GUEST-READY kernel=$(uname -r) disk=$disk cdrom=$cd"
while true; do setsid cttyhack sh -l; done
INIT
chmod 755 root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > initrd.img

# Data disks: ext4 with a marker the init script reports, as raw and as qcow2.
truncate -s 16M disk.raw
mkdir diskroot && echo "test-disk" > diskroot/kvmgate-disk
mkfs.ext4 -q -F -d diskroot disk.raw
qemu-img convert -f raw -O qcow2 disk.raw disk.qcow2
mkdir cdroot && echo "test-cd" > cdroot/kvmgate-cd
genisoimage -quiet -R -J -o cd.iso -V KVMGATECD cdroot

mkdir -p "$OUT"
cp kernel/boot/vmlinuz-"$kver" "$OUT/vmlinuz.tmp"
for f in initrd.img disk.raw disk.qcow2 cd.iso; do cp "$f" "$OUT/$f.tmp"; done
echo "$kpkg" > "$OUT/kernel-package"
for f in vmlinuz initrd.img disk.raw disk.qcow2 cd.iso; do chmod 0644 "$OUT/$f.tmp"; mv "$OUT/$f.tmp" "$OUT/$f"; done
chmod 0755 "$OUT"
echo "$RECIPE" > "$OUT/recipe"
echo "$OUT"
