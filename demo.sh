#!/bin/sh
# kvmgate demo: set up this host, define a VM for a demo user, start it through
# kvmgate, print the guest's boot line from its serial console, and stop it.
#
#   sudo ./demo.sh [--accel auto|kvm|tcg]
#
# Without --accel the policy's default, "auto" (KVM if usable, else TCG), is used,
# except inside a virtual machine, where nested KVM is often broken: there the
# demo chooses TCG and says so.
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (sudo ./demo.sh)" >&2; exit 3; }
accel=
[ "${1:-}" = --accel ] && accel=$2
if [ -z "$accel" ]; then
    if grep -qw hypervisor /proc/cpuinfo; then
        accel=tcg; echo "demo: this host is itself a VM; using TCG (pass --accel auto to try nested KVM)"
    else
        accel=auto
    fi
fi
user=kvmdemo vm=demo

sh scripts/debian-deps.sh runtime
guest=$(sh guest/build-test-guest.sh)
./install.sh
kvmgate admin init --accel "$accel"
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"

# Start from a clean definition each time the demo runs.
kvmgate stop "$vm" --owner "$user" --force >/dev/null 2>&1 || true
kvmgate admin delete "$vm" --owner "$user" >/dev/null 2>&1 || true
kvmgate admin create "$vm" --owner "$user" --disk-size 64M --forward http -- \
    -m 256 -nographic \
    -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" -append "console=ttyS0 quiet kvmgate.httpd"
kvmgate admin show "$vm" --owner "$user" | grep -E '^(owner|name|options):'

# From here on, everything is the demo user's own command: the front end runs as
# kvmdemo and reaches the privileged helper through sudo (see /etc/sudoers.d/kvmgate).
as_user() { runuser -u "$user" -- "$@"; }
cd /tmp
as_user kvmgate start "$vm"
line=$(as_user kvmgate console "$vm" --expect 'KVMGATE-GUEST-READY[^\r\n]*[\r\n]' --timeout 120 </dev/null \
       | tr -d '\r' | grep -a -o 'KVMGATE-GUEST-READY.*' | head -n 1)
echo "demo: guest boot line: $line"
as_user kvmgate list

# The guest's web server, through the port kvmgate forwards from its pool (loopback,
# and usable by the VM's owner only).
as_user kvmgate ports "$vm"
port=$(as_user kvmgate ports "$vm" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["port"])')
page=$(as_user python3 -c '
import sys, time, urllib.request
for _ in range(60):
    try:
        print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=5).read().decode().strip()); break
    except OSError:
        time.sleep(0.5)
' "$port")
echo "demo: the guest's web page through forwarded port $port: $page"

# The note's second logon path: the VM is frozen or hibernated while its user is away.
printf 'echo demo-marker-$((6*7)) > /marker; echo wr""ote\n' \
    | as_user kvmgate console "$vm" --expect 'wrote' --timeout 30 >/dev/null
as_user kvmgate freeze "$vm"
echo "demo: $(as_user kvmgate status "$vm" | grep '^state:')"
as_user kvmgate thaw "$vm"
as_user kvmgate hibernate "$vm"
as_user kvmgate status "$vm" | grep -E '^(state|saved_at|saved_bytes):' | sed 's/^/demo: /'
as_user kvmgate start "$vm"
marker=$(printf 'cat /marker\n' | as_user kvmgate console "$vm" --expect 'demo-marker-42' --timeout 30 \
         | tr -d '\r' | grep -a -o 'demo-marker-42' | tail -n 1)
echo "demo: after restore the guest still has: $marker"
as_user kvmgate status "$vm"
echo "demo: $user cannot run KVM directly: $(as_user qemu-system-x86_64 -accel kvm -display none -nodefaults 2>&1 | tail -n 1)"
as_user kvmgate stop "$vm" --timeout 20
echo "demo: ok"
