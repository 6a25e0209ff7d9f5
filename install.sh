#!/bin/sh
# Install kvmgate's runtime (stdlib-only) into root-owned locations.
#
#   ./install.sh [--prefix /usr/local] [--libdir DIR] [--etc /etc/kvmgate] [--cockpit DIR]
#                [--state /var/lib/kvmgate] [--run /run/kvmgate] [--log /var/log/kvmgate]
#                [--sudoers /etc/sudoers.d/kvmgate] [--unitdir /etc/systemd/system]
#                [--systemd auto|yes|no] [--test-pause-points CONTROL_FILE]
#
# The systemd units go into --unitdir with this installation's paths; when systemd
# is PID 1 (--systemd auto) they are enabled and started. Without systemd,
# `kvmgate admin init` says what does not run and `admin init --cron` installs
# cron lines instead.
#
# The helper and front end run under /usr/bin/python3 -I -S: no PYTHON* variable,
# user site or site-packages reaches them; they import the standard library and
# the copy of kvmgate installed here, nothing else. The chosen paths are baked into
# kvmgate/_install.py, so nothing a caller controls can move them.
set -eu
prefix=/usr/local libdir= etc=/etc/kvmgate state=/var/lib/kvmgate run=/run/kvmgate log=/var/log/kvmgate
sudoers=/etc/sudoers.d/kvmgate pause= unitdir=/etc/systemd/system systemd=auto cockpit=/usr/share/cockpit/kvmgate
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2 ;; --libdir) libdir=$2 ;; --etc) etc=$2 ;; --state) state=$2 ;;
        --run) run=$2 ;; --log) log=$2 ;; --sudoers) sudoers=$2 ;;
        --unitdir) unitdir=$2 ;; --systemd) systemd=$2 ;; --cockpit) cockpit=$2 ;;
        # The test suite's own installation only: the helper stops at named points
        # while root's CONTROL_FILE names them (kvmgate/store/critical.py).
        --test-pause-points) pause=$2 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
case "$systemd" in auto | yes | no) ;; *) echo "install.sh: --systemd takes auto, yes or no" >&2; exit 2 ;; esac
case "$cockpit" in /*/kvmgate) ;; *) echo "install.sh: --cockpit takes a directory named kvmgate (it is replaced whole)" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 3; }
libdir=${libdir:-$prefix/lib/kvmgate}
src=$(cd "$(dirname "$0")" && pwd)/src/kvmgate
python=/usr/bin/python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install.sh: $python must be 3.11 or newer" >&2; exit 1; }

umask 022
mkdir -p "$libdir.new.$$" "$prefix/bin"
cp -R "$src" "$libdir.new.$$/kvmgate"
find "$libdir.new.$$" -name '__pycache__' -prune -exec rm -rf {} +
cat > "$libdir.new.$$/kvmgate/_install.py" <<PY
"""Written by install.sh: where this installation keeps things."""
PATHS = {
    "etc": "$etc",
    "state": "$state",
    "run": "$run",
    "log": "$log",
    "helper": "$libdir/kvmgate-helper",
    "sudo": "/usr/bin/sudo",
    "sudoers": "$sudoers",
    "cockpit": "$cockpit",
}
PY
[ -z "$pause" ] || echo "PAUSE_CONTROL = \"$pause\"  # test installation: pause points" >> "$libdir.new.$$/kvmgate/_install.py"
cat > "$libdir.new.$$/kvmgate-helper" <<PY
#!$python -IS
# kvmgate's privileged helper. Reached by users only through sudo (see sudoers).
import os
import sys
sys.path.insert(0, "$libdir")
from kvmgate.entry import main
code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # skip interpreter teardown: it is a tenth of the helper's start-up time
PY
cat > "$libdir.new.$$/kvmgate-frontend" <<PY
#!$python -IS
import os
import sys
sys.path.insert(0, "$libdir")
from kvmgate.cli.main import main
code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # skip interpreter teardown
PY
cat > "$libdir.new.$$/kvmgate-pam" <<PY
#!$python -IS
# kvmgate's PAM session hook, run as root by pam_exec with the service and the
# event as its words (see docs/logon.md). Always exits 0.
import os
import sys
sys.path.insert(0, "$libdir")
try:
    from kvmgate.verbs.logon import main
    main(sys.argv[1:])
finally:
    os._exit(0)
PY
# The PAM line runs kvmgate-pam-start, a script for the static busybox shell: it must
# never run a dynamically linked program under the PAM environment (packaging/pam).
sed -e "s|@RUN@|$run|g" -e "s|@LIBDIR@|$libdir|g" "$src/../../packaging/pam/kvmgate-pam-start" \
    > "$libdir.new.$$/kvmgate-pam-start"
cat > "$libdir.new.$$/kvmgate-gated" <<PY
#!$python -IS
# kvmgate's wake-on-connect daemon; runs unprivileged as kvmgate-gated (see docs/logon.md).
import sys
sys.path.insert(0, "$libdir")
from kvmgate.gated import main
sys.exit(main())
PY
chmod 0755 "$libdir.new.$$/kvmgate-helper" "$libdir.new.$$/kvmgate-frontend" "$libdir.new.$$/kvmgate-pam" \
    "$libdir.new.$$/kvmgate-pam-start" "$libdir.new.$$/kvmgate-gated"
chown -R root:root "$libdir.new.$$"
chmod -R go-w "$libdir.new.$$"
rm -rf "$libdir.old.$$"
[ -e "$libdir" ] && mv "$libdir" "$libdir.old.$$"
mv "$libdir.new.$$" "$libdir"
rm -rf "$libdir.old.$$"
# Byte-compile as root, in place, so Python never writes caches at run time.
"$python" -I -S -m compileall -q -f "$libdir/kvmgate" >/dev/null
ln -sf "$libdir/kvmgate-frontend" "$prefix/bin/kvmgate"
# The Cockpit page (docs/cockpit.md): plain files, the front end's path written in, and
# noVNC and xterm.js copied in where this host has them (admin init --cockpit fetches them).
rm -rf "$cockpit.new.$$"
mkdir -p "$cockpit.new.$$"
cp -R "$src/../../cockpit/kvmgate/." "$cockpit.new.$$/"
"$python" -I -S - "$libdir" "$cockpit.new.$$" "$prefix/bin/kvmgate" "$log/audit.log" >/dev/null <<'PY'
import json, sys
libdir, page, kvmgate, audit = sys.argv[1:]
sys.path.insert(0, libdir)
from kvmgate.host.cockpit import vendor
with open(f"{page}/config.js", "w") as f:
    f.write(f"export const KVMGATE = {json.dumps(kvmgate)};\nexport const AUDIT_LOG = {json.dumps(audit)};\n")
vendor(page)
PY
chmod -R go-w "$cockpit.new.$$"
rm -rf "$cockpit"
mv "$cockpit.new.$$" "$cockpit"
# The documentation the units and --help point at, and the units and PAM snippet to copy from.
doc=$prefix/share/doc/kvmgate
mkdir -p "$doc"
cp "$src/../../docs/"*.md "$src/../../README.md" "$doc/"
cp -R "$src/../../packaging" "$doc/"
# The audit log's rotation (the helper also bounds it itself), named like the sudoers drop-in.
if [ -d /etc/logrotate.d ]; then
    sed "s|/var/log/kvmgate/audit.log|$log/audit.log|" "$src/../../packaging/logrotate/kvmgate" \
        > "/etc/logrotate.d/$(basename "$sudoers")"
    chmod 0644 "/etc/logrotate.d/$(basename "$sudoers")"
fi
# Upgrades of an installed PAM hook (a host without one is left alone):
# - the hook moved from common-session (one line for every service, identity from
#   the environment) to sshd's and login's own stacks (identity from the loginuid).
#   Session records the old hook wrote may name the wrong user (a ~/.pam_environment
#   could choose it): drop them all. A user who is logged on counts again at the next
#   logon; nobody's VM is frozen or thawed by the drop itself;
# - a line that runs kvmgate-pam itself (dynamically linked, under the PAM
#   environment) is replaced by one through kvmgate-pam-start. Where that cannot be
#   installed safely (no static /bin/busybox), the hook is removed, and it says why.
legacy=no
grep -qs "$libdir/kvmgate-pam" /etc/pam.d/common-session && legacy=yes
if [ "$legacy" = yes ] || grep -qsE "$libdir/kvmgate-pam (sshd|login) " /etc/pam.d/sshd /etc/pam.d/login; then
    "$python" -I -S -c "import sys; sys.path.insert(0, '$libdir')
from kvmgate.errors import KvmgateError
from kvmgate.host.pam import install_pam, uninstall_pam
from kvmgate.paths import installed
try:
    print(install_pam(installed()))
except KvmgateError as err:
    print(uninstall_pam(installed()))
    print(f'kvmgate: the PAM hook was removed: {err}')"
    [ "$legacy" = no ] || rm -rf "$run/sessions"
fi
# The host's service manager runs what must run: the reap timer, the networks at boot,
# autostart (which hands service VMs to their kvmgate-vm@ watchers), kvmgate-gated.
mkdir -p "$unitdir"
for unit in "$src/../../packaging/systemd/"*; do
    sed -e "s|/usr/local/bin/kvmgate|$prefix/bin/kvmgate|g" -e "s|/usr/local/lib/kvmgate|$libdir|g" \
        -e "s|/usr/local/share/doc/kvmgate|$doc|g" "$unit" > "$unitdir/$(basename "$unit")"
    chmod 0644 "$unitdir/$(basename "$unit")"
done
if [ "$systemd" = auto ]; then
    if [ -d /run/systemd/system ]; then systemd=yes; else systemd=no; fi
fi
if [ "$systemd" = yes ]; then
    systemctl daemon-reload
    systemctl enable --now kvmgate-runtime.service kvmgate-network.service kvmgate-reap.timer \
        kvmgate-autostart.service kvmgate-gated.service kvmgate-guests.service kvmgate-sessions.service
    echo "enabled and started the kvmgate units in $unitdir"
else
    echo "systemd is not running here: the units in $unitdir will not run; see: $prefix/bin/kvmgate admin init"
fi
echo "installed kvmgate in $libdir (command: $prefix/bin/kvmgate)"
