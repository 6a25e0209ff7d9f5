"""Logons taken from logind, not from a PAM hook: `admin sessions --watch` (what
kvmgate-sessions.service runs) follows elogind, which stands in for
systemd-logind on this machine (systemd is not PID 1 here, and Debian's elogind
package conflicts with systemd's, so its binaries are extracted and run beside
a system D-Bus the test starts). Real ssh logins through sshd's PAM stack
register with it through pam_systemd, as on any systemd host; kvmgate's PAM
hook is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import KVMGATE, Kvmgate, boot_options
from .test_ssh_logon import Sshd

CACHE = Path("/var/cache/kvmgate-test-elogind")
POLICY_CONF = Path("/usr/share/dbus-1/system.d/org.freedesktop.login1.conf")
BUS = "/run/dbus/system_bus_socket"


def _extracted() -> Path:
    version = subprocess.run(["apt-cache", "policy", "elogind"], capture_output=True, text=True).stdout
    root = CACHE / version.split("Candidate:", 1)[1].split()[0]
    if not (root / "lib/elogind/elogind").exists():
        work = CACHE / "download"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        work.chmod(0o777)  # apt's sandbox user downloads into it
        subprocess.run(["apt-get", "download", "elogind", "libelogind0"], cwd=work, check=True, capture_output=True)
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        shutil.rmtree(work)
    return root


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(path) == 0


def _wait(what: str, check, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def elogind(kg: Kvmgate) -> Iterator[Path]:
    root = _extracted()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LD_LIBRARY_PATH": f"{root}/lib/x86_64-linux-gnu:{root}/lib/elogind"}  # fmt: skip
    placed = not POLICY_CONF.exists()
    if placed:
        shutil.copy(root / POLICY_CONF.relative_to("/"), POLICY_CONF)
    bus = None
    if not _answers(BUS):
        os.makedirs("/run/dbus", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(BUS)  # a bus that died leaves its socket behind
        bus = subprocess.Popen(["dbus-daemon", "--system", "--nofork", "--nopidfile"])
        _wait("the system bus", lambda: _answers(BUS))
    else:
        subprocess.run(["dbus-send", "--system", "--type=method_call", "--dest=org.freedesktop.DBus", "/",
                        "org.freedesktop.DBus.ReloadConfig"], check=True)  # fmt: skip
    daemon = subprocess.Popen([str(root / "lib/elogind/elogind")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    _wait("elogind", lambda: os.path.isdir("/run/systemd/seats"))
    watcher = subprocess.Popen([KVMGATE, "admin", "sessions", "--watch"])
    yield root
    watcher.terminate()
    watcher.wait(30)
    daemon.terminate()
    daemon.wait(30)
    if bus is not None:
        bus.terminate()
        bus.wait(30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(BUS)
    if placed:
        POLICY_CONF.unlink()


def state(kg: Kvmgate, user: str, vm: str) -> str:
    return str(kg.json("status", vm, "--owner", user)["state"])  # type: ignore[index]


def logind_records(kg: Kvmgate, user: str) -> list[str]:
    rows = kg.json("admin", "sessions")
    return [s for r in rows if r["user"] == user for s in r["sessions"] if s.startswith("logind-")]  # type: ignore[union-attr,index]


def test_logins_are_taken_from_logind_without_a_pam_hook(
    kg: Kvmgate, users, elogind: Path, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    assert "kvmgate-pam" not in Path("/etc/pam.d/sshd").read_text(), "no hook on the login path"
    user = users.make("kgl")
    sshd.authorize(user)
    kg.ok("admin", "create", vm_name, "--owner", user, "--on-logoff", "pause", "--logoff-delay", "2",
          "--", *boot_options(guest))  # fmt: skip
    cleanup_vms.append((user, vm_name))

    # A session held open: logind has it, kvmgate counts it, and the VM runs past the delay.
    held = sshd.popen(user, f"{KVMGATE} start {vm_name}; sleep 12")
    try:
        _wait("the logind session is counted", lambda: bool(logind_records(kg, user)))
        _wait("the VM runs", lambda: state(kg, user, vm_name) == "running")
        time.sleep(4)
        assert state(kg, user, vm_name) == "running", "a logged-on owner's VM is never paused"
    finally:
        held.wait(60)
    # The last session closed: paused after the logoff delay.
    _wait("paused after the delay", lambda: state(kg, user, vm_name) == "paused", timeout=30)
    assert not logind_records(kg, user)
    # A new logon (a one-shot command is one too) thaws it.
    r = sshd.run(user, "sleep 1")
    assert r.returncode == 0, r.stderr
    _wait("thawed at the next logon", lambda: state(kg, user, vm_name) == "running", timeout=30)


def test_sessions_logind_does_not_count_are_not_logons(
    kg: Kvmgate, users, elogind: Path, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    """`su -l` (PAM service su-l) is a logind session, but not a logon."""
    user = users.make("kgl")
    kg.ok("admin", "create", vm_name, "--owner", user, "--on-logoff", "pause", "--logoff-delay", "0",
          "--", *boot_options(guest))  # fmt: skip
    cleanup_vms.append((user, vm_name))
    kg.ok("start", vm_name, "--owner", user)
    su = subprocess.Popen(["su", "-l", user, "-c", "sleep 5"])
    try:
        env = {"LD_LIBRARY_PATH": f"{elogind}/lib/x86_64-linux-gnu:{elogind}/lib/elogind"}
        _wait("logind has the su session", lambda: user in subprocess.run(
            [str(elogind / "bin/loginctl"), "list-sessions", "--no-legend"], env=env, capture_output=True,
            text=True).stdout)  # fmt: skip
        time.sleep(2)
        assert not logind_records(kg, user)
        assert state(kg, user, vm_name) == "running"
    finally:
        su.wait(30)


def test_admin_sessions_json(kg: Kvmgate, elogind: Path) -> None:
    rows = json.loads(kg.ok("admin", "sessions", "--json").stdout)
    assert isinstance(rows, list)
