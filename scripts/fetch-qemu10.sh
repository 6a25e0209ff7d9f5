#!/bin/sh
# Fetch Debian 13's QEMU (10.0, from the bookworm-backports suite of the host's own mirror) and lay it
# out beside the system's QEMU, never replacing it: a second, root-owned tree whose binary the policy's
# `qemu` can name. It runs with the host's firmware (SeaBIOS, iPXE), copied in: migration between two
# QEMUs compares ROM sizes, so a state saved under one restores under the other only with the same
# firmware. apt runs with a private sources list, lists and archive directory: the host's apt
# configuration is not touched. The result is cached, keyed by a hash of this script.
#
# usage: scripts/fetch-qemu10.sh [CACHE_DIR]    (default /var/cache/kvmgate-qemu10)
# prints the path of the qemu-system-x86_64 binary on success.
set -eu
OUT=${1:-${KVMGATE_QEMU10_DIR:-/var/cache/kvmgate-qemu10}}
RECIPE="qemu10-$(sha256sum < "$0" | cut -c1-16)"
BIN="$OUT/root/usr/bin/qemu-system-x86_64"
if [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ] && [ -x "$BIN" ]; then
    echo "$BIN"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "fetch-qemu10.sh: run as root (the tree must be root-owned)" >&2; exit 3; }
here=$(cd "$(dirname "$0")" && pwd)
umask 022
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
if [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$RECIPE" ] && [ -x "$BIN" ]; then
    echo "$BIN"; exit 0
fi
work=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
trap 'exit 1' INT TERM HUP

mirror=$(sh "$here/host-mirror.sh")
mkdir -p "$work/lists/partial" "$work/debs" "$work/root"
# apt checks the suite's signature with Debian's archive key only, not whatever else the host trusts.
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "fetch-qemu10.sh: $keyring is missing (package debian-archive-keyring)" >&2; exit 1; }
echo "deb [signed-by=$keyring] $mirror bookworm-backports main" > "$work/sources.list"
chmod 755 "$work"
chown -R _apt "$work/lists" "$work/debs"  # apt's downloads run as its own _apt account
apt_private() {
    apt-get -q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$work/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        "$@"
}
apt_private update >/dev/null
# Only the 10.0 series: a later backport would be another QEMU than the one this tree tests.
version=$(apt-cache -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$work/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
    madison qemu-system-x86 | awk -F'|' '$2 ~ /^ *1:10\.0\./ && $3 ~ /backports/ { gsub(/ /, "", $2); print $2; exit }')
[ -n "$version" ] || { echo "fetch-qemu10.sh: no QEMU 10.0 in $mirror bookworm-backports" >&2; exit 1; }
(cd "$work/debs" && apt_private download "qemu-system-x86=$version" "qemu-system-common=$version" \
    "qemu-system-data=$version" >/dev/null)
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done
# The host's firmware, where the relocated QEMU looks for it (its firmware path is relative to its binary).
for dir in /usr/share/seabios /usr/lib/ipxe/qemu /usr/share/ipxe; do
    if [ -d "$dir" ]; then
        mkdir -p "$work/root$dir"
        cp -a "$dir/." "$work/root$dir/"
    fi
done
chown -R root:root "$work/root"
chmod -R go-w,ug-s "$work/root"  # no set-id bits: nothing here is meant to run as anyone but its caller
chmod 755 "$work/root"
# Asked as nobody: root never runs what it just downloaded.
runuser -u nobody -- "$work/root/usr/bin/qemu-system-x86_64" --version | grep -q "version 10\.0\." || {
    echo "fetch-qemu10.sh: the extracted QEMU does not say it is 10.0" >&2; exit 1; }
rm -rf --one-file-system "$OUT/root"
mv "$work/root" "$OUT/root"
echo "$version" > "$OUT/version"
echo "$RECIPE" > "$OUT/recipe"
echo "$BIN"
