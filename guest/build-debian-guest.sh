#!/bin/sh
# Build a small bootable Debian 12 (bookworm) cloud-style disk image from the host's apt mirror:
# BIOS boot (syslinux on a FAT partition), an ext4 root, systemd-networkd DHCP on every NIC,
# sshd with host keys made at boot, qemu-guest-agent, and a tiny first-boot script that reads
# the NoCloud seed (a CD-ROM labelled "cidata") kvmgate writes. No loop devices or mounts are
# needed: the file systems are built from directories and written into the disk image at offsets.
# The result is cached outside the repository, keyed by a hash of this script.
#
# usage: guest/build-debian-guest.sh [CACHE_DIR]    (default /var/cache/kvmgate-debian-guest)
#   KVMGATE_DEBIAN_MIRROR=URL overrides the mirror read from /etc/apt/sources.list{,.d} (scripts/host-mirror.sh).
# prints the cache directory (holding debian.qcow2 and recipe) on success.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
# KVMGATE_GUEST_FLAVOR=shares (guest/build-shares-guest.sh): the same guest plus an NFS and Samba server
# driven by kvmgate's owner map (guest/kvmgate-shares, docs/services.md) and their clients.
FLAVOR=${KVMGATE_GUEST_FLAVOR:-base}
case $FLAVOR in
base) OUT=${1:-${KVMGATE_DEBIAN_DIR:-/var/cache/kvmgate-debian-guest}} ;;
shares) OUT=${1:-/var/cache/kvmgate-shares-guest} ;;
*) echo "unknown KVMGATE_GUEST_FLAVOR $FLAVOR" >&2; exit 2 ;;
esac
# Any change to this script (or, for shares, to the agent) changes what it builds: their hash is the recipe.
if [ "$FLAVOR" = base ]; then
    RECIPE="bookworm-$(sha256sum < "$0" | cut -c1-16)"
else
    RECIPE="bookworm-$FLAVOR-$(cat "$0" "$here/guest/kvmgate-shares" | sha256sum | cut -c1-16)"
fi
if [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ] && [ -f "$OUT/debian.qcow2" ]; then
    echo "$OUT"; exit 0
fi

need() { command -v "$1" >/dev/null 2>&1; }
pkgs=""
need mmdebstrap || pkgs="$pkgs mmdebstrap"
need mkfs.ext4 || pkgs="$pkgs e2fsprogs"
need mkfs.fat || pkgs="$pkgs dosfstools"
need mcopy || pkgs="$pkgs mtools"
need syslinux || pkgs="$pkgs syslinux"
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || pkgs="$pkgs syslinux-common"
need sfdisk || pkgs="$pkgs fdisk"
need qemu-img || pkgs="$pkgs qemu-utils"
if [ -n "$pkgs" ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

mkdir -p "$OUT"
# One build at a time; a second caller waits and then finds the image ready.
exec 9>"$OUT/.lock"
flock 9
if [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ] && [ -f "$OUT/debian.qcow2" ]; then
    echo "$OUT"; exit 0
fi

work=$(mktemp -d)
# --one-file-system: never follow into a mount an interrupted mmdebstrap may have left.
trap 'rm -rf --one-file-system "$work" "$OUT/debian.qcow2.tmp" "$OUT/recipe.tmp"' EXIT
trap 'exit 1' INT TERM HUP

# --- The mirror: the host's own (scripts/host-mirror.sh). ---
mirror=$(sh "$here/scripts/host-mirror.sh")
security=$(sh "$here/scripts/host-mirror.sh" security)
set -- "deb $mirror bookworm main" "deb $mirror bookworm-updates main"
[ -z "$security" ] || set -- "$@" "deb $security bookworm-security main"

# --- Files laid into the root before the packages are installed, so the kernel's postinst
# builds the initramfs once, with this configuration. ---
rootuuid=$(cat /proc/sys/kernel/random/uuid)
o=$work/overlay
mkdir -p "$o/etc/initramfs-tools/conf.d" "$o/etc/initramfs-tools/hooks" "$o/etc/systemd/network" \
    "$o/etc/systemd/system/ssh.service.d" "$o/etc/ssh/sshd_config.d" "$o/usr/local/sbin" \
    "$o/etc/initramfs/post-update.d"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$rootuuid" > "$o/etc/fstab"
# Only the drivers a QEMU disk needs: a small initramfs unpacks and boots fast under TCG.
echo "MODULES=list" > "$o/etc/initramfs-tools/conf.d/kvmgate"
cat > "$o/etc/initramfs-tools/hooks/kvmgate" <<'EOF'
#!/bin/sh
# Disk drivers for QEMU's IDE, AHCI, virtio and NVMe disks, and the root file system.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in ata_piix ata_generic ahci sd_mod virtio_pci virtio_blk virtio_scsi nvme \
         ext4 crc32c_generic crc32c_intel; do
    manual_add_modules "$m"
done
EOF
# The boot partition is not mounted; copy a new kernel or initramfs onto it when one is made.
cat > "$o/etc/initramfs/post-update.d/kvmgate-boot" <<'EOF'
#!/bin/sh
# Put the newest kernel and initramfs on the FAT boot partition syslinux boots from.
set -e
[ -e /dev/disk/by-label/KVMBOOT ] || exit 0
[ "$1" = "$(ls /lib/modules | sort -V | tail -n 1)" ] || exit 0   # only the newest kernel boots
m=$(mktemp -d)
mount -t vfat /dev/disk/by-label/KVMBOOT "$m"
cp /boot/vmlinuz-"$1" "$m/vmlinuz.new" && mv "$m/vmlinuz.new" "$m/vmlinuz"
cp "$2" "$m/initrd.new" && mv "$m/initrd.new" "$m/initrd.img"
umount "$m"; rmdir "$m"
EOF
cat > "$o/etc/systemd/network/80-dhcp.network" <<'EOF'
# DHCP on every ethernet NIC, whatever its name.
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
# Host keys are not in the image: each VM makes its own before sshd first starts. Only
# ed25519 and ECDSA: an RSA key takes 10-20 s to make under TCG.
cat > "$o/etc/systemd/system/ssh.service.d/hostkeys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c '[ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/bin/sh -c '[ -s /etc/ssh/ssh_host_ecdsa_key ] || ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
cat > "$o/etc/ssh/sshd_config.d/kvmgate.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
PasswordAuthentication no
KbdInteractiveAuthentication no
EOF
cat > "$o/etc/systemd/system/kvmgate-seed.service" <<'EOF'
[Unit]
Description=Apply the kvmgate NoCloud seed (hostname, users, ssh keys)
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target ssh.service systemd-user-sessions.service shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kvmgate-seed
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
EOF
cat > "$o/usr/local/sbin/kvmgate-seed" <<'EOF'
#!/bin/sh
# The part of cloud-init's NoCloud data source kvmgate writes, run at every boot:
#   meta-data  "local-hostname: NAME"             -> hostname
#   user-data  "#cloud-config" + a JSON object    -> hostname, users, ssh keys, sudo rules
# Keys and sudo rules are rewritten each boot. No seed: nothing to do.
set -u
log() { echo "kvmgate-seed: $*"; }
# The CD-ROM driver makes /dev/sr0 as it loads, so the label is usually found at once; else
# wait for udev to finish the devices found at boot, once.
modprobe -q -a sr_mod isofs 2>/dev/null
find_seed() { blkid -L cidata 2>/dev/null || blkid -L CIDATA 2>/dev/null; }
dev=$(find_seed) || { udevadm settle --timeout=10; dev=$(find_seed); } || { log "no seed"; exit 0; }
run=$(mktemp -d /run/kvmgate-seed.XXXXXX)
mkdir "$run/seed" "$run/keys"
trap 'umount "$run/seed" 2>/dev/null; rm -rf "$run"' EXIT
mount -o ro "$dev" "$run/seed" || { log "cannot mount $dev"; exit 1; }

host=""
if [ -f "$run/seed/meta-data" ]; then
    host=$(sed -n 's/^local-hostname:[[:space:]]*//p' "$run/seed/meta-data" | head -n 1 | tr -d "\"'\r")
fi
# One jq run turns user-data into a plan, one record a line (jq is slow to start under TCG):
#   H host | U user shell | K user key | S user sudo-rule | R refused-name
# Top-level keys (and "default" in users) go to the default user "debian", as on Debian's
# cloud images. Strings with a newline are dropped so that a record stays one line.
: > "$run/plan"
if [ -f "$run/seed/user-data" ] && head -n 1 "$run/seed/user-data" | grep -q '^#cloud-config'; then
    tail -n +2 "$run/seed/user-data" | jq -r '
        def one: strings | select(test("\n") | not);
        def list: if type == "array" then .[] else . end | one;
        if type != "object" then error("not an object") else . end |
        (.hostname | one | "H \(.)"),
        (if ((.ssh_authorized_keys // []) | length) > 0 or any(.users[]?; . == "default") then
            "U debian /bin/bash", (.ssh_authorized_keys // [] | list | "K debian \(.)"),
            "S debian ALL=(ALL) NOPASSWD:ALL"
         else empty end),
        (.users[]? | objects | .name as $n |
         if ($n | type) == "string" and ($n | test("^[a-z_][a-z0-9_-]{0,31}$")) then
            "U \($n) \((.shell | one | select(test("^/[^\\s]+$"))) // "/bin/bash")",
            (.ssh_authorized_keys // [] | list | "K \($n) \(.)"),
            (.sudo // [] | list | "S \($n) \(.)")
         else "R \($n | tojson)" end)' > "$run/plan" ||
        { log "user-data is not a JSON object after #cloud-config; ignored"; : > "$run/plan"; }
fi
: > "$run/sudoers"
while read -r kind name rest; do
    case $kind in
    H) [ -z "$rest" ] && host=$name ;;
    R) log "refusing user name $name" ;;
    U)  # a user whose shell is unknown gets bash; keys and rules follow its U line
        grep -qxF "$rest" /etc/shells || { log "$name: shell '$rest' not in /etc/shells, using /bin/bash"; rest=/bin/bash; }
        id "$name" >/dev/null 2>&1 || useradd -m -U -s "$rest" "$name" || { log "cannot create $name"; continue; }
        touch "$run/keys/$name" ;;
    K) [ -f "$run/keys/$name" ] && printf '%s\n' "$rest" >> "$run/keys/$name" ;;
    S) [ -f "$run/keys/$name" ] && printf '%s %s\n' "$name" "$rest" >> "$run/sudoers" ;;
    esac
done < "$run/plan"

# authorized_keys replaced whole; install(1) unlinks the target first, so no symlink is followed.
for f in "$run"/keys/*; do
    [ -f "$f" ] || continue
    u=${f##*/}; g=$(id -gn "$u"); home=$(getent passwd "$u" | cut -d: -f6)
    [ -d "$home" ] || { log "$u has no home"; continue; }
    [ -L "$home/.ssh" ] && rm -f "$home/.ssh"
    install -d -m 700 -o "$u" -g "$g" "$home/.ssh"
    install -m 600 -o "$u" -g "$g" "$f" "$home/.ssh/authorized_keys"
done
# Sudo rules: installed only if visudo accepts them.
s=/etc/sudoers.d/90-cloud-init-users
{ echo "# written by kvmgate-seed from the NoCloud user-data"; cat "$run/sudoers"; } > "$s.new"
chmod 440 "$s.new"
if visudo -cqf "$s.new"; then mv -f "$s.new" "$s"; else log "bad sudo rules, ignored"; rm -f "$s.new"; fi

if [ -n "$host" ]; then
    if printf '%s\n' "$host" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9.-]{0,62}'; then
        echo "$host" > /etc/hostname
        hostname "$host"
        sed -i '/^127\.0\.1\.1[[:space:]]/d' /etc/hosts
        printf '127.0.1.1\t%s\n' "$host" >> /etc/hosts
    else
        log "refusing hostname $host"
    fi
fi
log "applied seed from $dev${host:+ (hostname $host)}"
EOF
# A VM's disk may be made bigger than the image (an overlay with a larger size, or a resize):
# grow the root partition and file system into the new space, as cloud images do.
cat > "$o/etc/systemd/system/kvmgate-growroot.service" <<'EOF'
[Unit]
Description=Grow the root file system to fill its disk
DefaultDependencies=no
After=local-fs.target
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kvmgate-growroot

[Install]
WantedBy=multi-user.target
EOF
cat > "$o/usr/local/sbin/kvmgate-growroot" <<'EOF'
#!/bin/sh
# Grow the root partition (the disk's last) and its ext4 when more than 16 MiB follow it.
set -eu
part=$(basename "$(readlink -f "$(findmnt -no SOURCE /)")")
sys=/sys/class/block/$part
disk=$(basename "$(readlink -f "$sys/..")")
end=$(($(cat "$sys/start") + $(cat "$sys/size")))
[ $(($(cat "/sys/class/block/$disk/size") - end)) -gt 32768 ] || exit 0
n=$(cat "$sys/partition")
echo ", +" | sfdisk -q --force --no-reread --no-tell-kernel -N "$n" "/dev/$disk"
partx -u -n "$n" "/dev/$disk"   # the kernel may grow a partition that is in use
resize2fs "/dev/$part"
EOF
chmod 755 "$o/etc/initramfs-tools/hooks/kvmgate" "$o/etc/initramfs/post-update.d/kvmgate-boot" \
    "$o/usr/local/sbin/kvmgate-seed" "$o/usr/local/sbin/kvmgate-growroot"

extra=""
disable=""
mask=""
if [ "$FLAVOR" = shares ]; then
    # The owner map's reader: started by udev when the map disk (serial kvmgate-ownermap) appears,
    # so the same image is an ordinary client VM without it (nfs-server and smbd stay off).
    install -m 755 "$here/guest/kvmgate-shares" "$o/usr/local/sbin/kvmgate-shares"
    mkdir -p "$o/etc/udev/rules.d" "$o/etc/nfs.conf.d"
    cat > "$o/etc/udev/rules.d/99-kvmgate-shares.rules" <<'EOF'
SUBSYSTEM=="block", KERNEL=="vd*[!0-9]", ATTRS{serial}=="kvmgate-ownermap", TAG+="systemd", ENV{SYSTEMD_WANTS}+="kvmgate-shares.service"
EOF
    cat > "$o/etc/systemd/system/kvmgate-shares.service" <<'EOF'
[Unit]
Description=NFS and Samba shares per owner, from kvmgate's owner map
After=local-fs.target network.target
Before=shutdown.target

[Service]
ExecStart=/usr/local/sbin/kvmgate-shares
Restart=always
RestartSec=2
StandardOutput=journal+console
EOF
    # NFSv4 only: no mountd, statd or portmapper on the network, so no export list for anyone to read.
    cat > "$o/etc/nfs.conf.d/kvmgate.conf" <<'EOF'
[nfsd]
vers3=n
EOF
    extra=",python3,nfs-kernel-server,nfs-common,samba,smbclient"
    disable="nfs-server.service smbd.service"  # the agent starts them in a service VM only
    # NFSv4 needs neither the portmapper nor statd: masked, so nothing but nfsd (2049) and smbd (445)
    # listens, and there is no export list for anyone to read.
    mask="nmbd.service samba-ad-dc.service rpcbind.service rpcbind.socket rpc-statd.service"
fi

# --- The root file system. ---
# Recommends are off (mmdebstrap's default); docs, man pages and translations are left out.
mmdebstrap --quiet --variant=apt \
    --include=systemd,systemd-sysv,udev,dbus,libpam-systemd,systemd-resolved,kmod,passwd,netbase,iproute2,openssh-server,sudo,qemu-guest-agent,jq,e2fsprogs,fdisk,initramfs-tools,zstd,linux-image-cloud-amd64$extra \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --essential-hook="cp -a '$o/.' \"\$1/\"" \
    --customize-hook='chroot "$1" systemctl enable -q systemd-networkd systemd-resolved kvmgate-seed kvmgate-growroot' \
    --customize-hook='chroot "$1" systemctl mask -q systemd-networkd-wait-online.service systemd-firstboot.service e2scrub_reap.service e2scrub_all.timer' \
    --customize-hook='chroot "$1" passwd -q -l root' \
    --customize-hook="[ -z '$disable' ] || chroot \"\$1\" systemctl disable -q $disable" \
    --customize-hook="[ -z '$mask' ] || chroot \"\$1\" systemctl mask -q $mask" \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook='echo debian > "$1/etc/hostname"; printf "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
    --customize-hook='ln -sf ../run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"' \
    --customize-hook='rm -f "$1/var/lib/dbus/machine-id"; : > "$1/etc/machine-id"' \
    bookworm "$work/root" "$@"

kver=$(ls "$work/root/lib/modules" | sort -V | tail -n 1)
[ -f "$work/root/boot/initrd.img-$kver" ] || { echo "no initramfs was built for $kver" >&2; exit 1; }

# --- The disk: MBR, FAT boot partition (syslinux, kernel, initramfs), ext4 root. ---
disk_mib=2048; boot_mib=64
cd "$work"
mkfs.fat -C -h 2048 -n KVMBOOT boot.img $((boot_mib * 1024)) >/dev/null
syslinux --install boot.img
# console=ttyS0: the VM's console is the first serial port. root=UUID: IDE (sda) or virtio (vda).
cat > syslinux.cfg <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
    LINUX /vmlinuz
    INITRD /initrd.img
    APPEND root=UUID=$rootuuid ro console=tty0 console=ttyS0,115200n8
EOF
cp "root/boot/vmlinuz-$kver" vmlinuz
cp "root/boot/initrd.img-$kver" initrd.img
mcopy -i boot.img syslinux.cfg vmlinuz initrd.img ::/
truncate -s $((disk_mib - 1 - boot_mib))M root.img
mkfs.ext4 -q -F -L root -U "$rootuuid" -d root root.img
truncate -s "${disk_mib}M" disk.raw
printf 'label: dos\n2048,%d,e,*\n%d,,83\n' $((boot_mib * 2048)) $(((1 + boot_mib) * 2048)) | sfdisk -q disk.raw
dd if=/usr/lib/syslinux/mbr/mbr.bin of=disk.raw bs=440 count=1 conv=notrunc status=none
dd if=boot.img of=disk.raw bs=1M seek=1 conv=notrunc,sparse status=none
dd if=root.img of=disk.raw bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none

# Publish: each file appears whole (rename), the recipe last, so a crash leaves a rebuild.
qemu-img convert -f raw -O qcow2 disk.raw "$OUT/debian.qcow2.tmp"
chmod 0644 "$OUT/debian.qcow2.tmp"
mv "$OUT/debian.qcow2.tmp" "$OUT/debian.qcow2"
echo "$RECIPE" > "$OUT/recipe.tmp"
mv "$OUT/recipe.tmp" "$OUT/recipe"
chmod 0755 "$OUT"
echo "$OUT"
