#!/bin/sh
# Install the Debian packages kvmgate needs, only those missing.
#   scripts/debian-deps.sh runtime   what the product needs
#   scripts/debian-deps.sh test      plus what the test suite and benchmarks need
set -eu
runtime="python3 qemu-system-x86 qemu-utils sudo iproute2 util-linux nftables dnsmasq-base"
guest="busybox-static cpio genisoimage kmod e2fsprogs"
test="logrotate python3-venv openssh-server openssh-client procps psmisc iputils-ping samba gcc libc6-dev systemd"
# The Debian test guest (guest/build-debian-guest.sh), and what cloud-init's own parser needs to
# check kvmgate's seeds on the host (tests/integration/test_images.py).
test="$test mmdebstrap syslinux syslinux-common mtools dosfstools fdisk"
test="$test python3-yaml python3-jsonschema python3-jinja2 python3-configobj python3-jsonpatch python3-netifaces python3-requests"
# The Cockpit page's real-browser tests (tests/integration/test_cockpit.py).
test="$test cockpit-ws cockpit-bridge novnc chromium chromium-driver"
# The Slurm backend's clusters (tests/integration/test_slurm.py), started by the suite itself.
test="$test slurm-wlm slurm-client munge"
case "${1:-runtime}" in
    runtime) want="$runtime $guest" ;;
    test) want="$runtime $guest $test" ;;
    *) echo "usage: $0 runtime|test" >&2; exit 2 ;;
esac
missing=""
for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
