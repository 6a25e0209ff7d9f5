"""What must run besides the helper, where systemd does not run it.

On a host booted with systemd, install.sh installs and enables the units
(packaging/systemd): the reap timer, the networks and autostart at boot,
kvmgate-gated. Without systemd as PID 1 nothing runs them, and `admin init`
says so. `admin init --cron` installs the same work as cron lines, in
/etc/cron.d/<name> (named like the sudoers drop-in, as the logrotate snippet):

- every minute, `admin reap` (crashed sessions, logoff delays, lost workers);
- at boot, `admin init` (runtime directory, devices, networks) then
  `admin autostart`;
- every minute, kvmgate-gated if it is not running: root takes a lock in the
  root-only runtime directory with flock(1) and runs gated as its own account,
  so a second copy never starts and no other user can hold the lock;
- every minute, the logind session watcher if it is not running, likewise
  (it exits at once where no logind, elogind here, keeps sessions).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from kvmgate.paths import GATED_USER, Paths
from kvmgate.store.files import write_atomic

CRON_DIR = "/etc/cron.d"


def systemd_runs() -> bool:
    """systemd's own test for being PID 1 (sd_booted)."""
    return os.path.isdir("/run/systemd/system")


def watcher_unit(owner: str, name: str) -> str:
    """kvmgate-vm@OWNER:NAME.service, escaped as systemd escapes instance names
    (the unit reads it back with %I)."""
    argv = ["systemd-escape", "--template=kvmgate-vm@.service", f"{owner}:{name}"]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout.strip()


def start_watcher(owner: str, name: str) -> None:
    unit = watcher_unit(owner, name)
    subprocess.run(["systemctl", "start", "--no-block", unit], check=True, capture_output=True, timeout=60)


def cron_file(paths: Paths) -> str:
    return os.path.join(CRON_DIR, os.path.basename(paths.sudoers))


def cron_text(paths: Paths) -> str:
    helper = paths.helper
    gated = os.path.join(os.path.dirname(helper), "kvmgate-gated")
    lock = os.path.join(paths.run, "gated.cron.lock")
    sessions_lock = os.path.join(paths.run, "sessions.cron.lock")
    return (
        "# kvmgate: what its systemd units do, for a host without systemd (kvmgate admin init --cron)\n"
        "SHELL=/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"* * * * * root {helper} admin reap >/dev/null\n"
        f"@reboot root {helper} admin init >/dev/null; {helper} admin autostart >/dev/null\n"
        f"* * * * * root flock -n -E 0 {lock} runuser -u {GATED_USER} -- {gated} >/dev/null 2>&1\n"
        f"* * * * * root flock -n -E 0 {sessions_lock} {helper} admin sessions --watch >/dev/null 2>&1\n"
    )


def install_cron(paths: Paths) -> str:
    write_atomic(cron_file(paths), cron_text(paths), 0o644)
    note = "" if shutil.which("cron") else " (cron itself is not installed: apt-get install cron)"
    return (
        f"installed {cron_file(paths)}: reap every minute, init and autostart at boot, kvmgate-gated, "
        f"the logind session watcher{note}"
    )


def remove_cron(paths: Paths) -> str:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cron_file(paths))
        return f"removed {cron_file(paths)}"
    return f"{cron_file(paths)} was not installed"


def without_systemd(paths: Paths) -> str | None:
    """What `admin init` says on a host where the units cannot run (None: they can)."""
    if systemd_runs():
        return None
    if os.path.exists(cron_file(paths)):
        return f"systemd is not running here: {cron_file(paths)} runs what its units would"
    return (
        "systemd is not running here, so kvmgate's units do not run: nothing runs `admin reap` every minute "
        "(crashed sessions, logoff delays), `admin autostart` at boot, or kvmgate-gated (wake on connect). "
        f"`kvmgate admin init --cron` installs {cron_file(paths)} for them"
    )
