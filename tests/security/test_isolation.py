"""Attacks on other users' VMs and on KVM itself, run as real unprivileged users.
Each asserts the attack failed and that nothing leaked or changed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, KVMGATE, RUN, Kvmgate, as_user, boot_options
from .conftest import fd_targets

NOT_FOUND = "kvmgate: no such VM: {}\n"


# 1. Another user's VM looks exactly like a VM that does not exist.
@pytest.mark.parametrize("verb", ["start", "stop", "status", "console"])
def test_other_users_vm_is_indistinguishable_from_missing(
    kg: Kvmgate, bob: str, alice_vm: str, running: int, verb: str, unchanged: None
) -> None:
    theirs = kg(verb, alice_vm, user=bob)
    missing = kg(verb, "doesnotexist", user=bob)
    assert theirs.returncode == missing.returncode == 4
    assert theirs.stderr == NOT_FOUND.format(alice_vm)
    assert missing.stderr == NOT_FOUND.format("doesnotexist")
    assert theirs.stdout == missing.stdout == ""


def test_owner_flag_is_root_only(kg: Kvmgate, alice: str, bob: str, alice_vm: str, unchanged: None) -> None:
    r = kg("status", alice_vm, "--owner", alice, user=bob)
    assert r.returncode == 3 and "--owner is for root only" in r.stderr


def test_list_shows_only_own_vms(kg: Kvmgate, alice: str, bob: str, alice_vm: str, bob_vm: str) -> None:
    rows = json.loads(kg.ok("list", "--json", user=bob).stdout)
    assert {r["owner"] for r in rows} == {bob}
    assert alice_vm not in {r["name"] for r in rows}
    assert kg("list", "--owner", alice, user=bob).returncode == 3


# 12. The owner cannot ptrace their VM, read its memory, environment or fds, or steal fds.
PROBE = r"""
import ctypes, errno, json, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
r = libc.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
out["ptrace"] = errno.errorcode.get(ctypes.get_errno(), "OK") if r != 0 else "OK"
for name in ("mem", "environ"):
    try:
        open(f"/proc/{pid}/{name}", "rb").read(1)
        out[name] = "OK"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
try:
    os.readlink(f"/proc/{pid}/fd/3")  # the directory lists numbers; the links are what matters
    out["fd"] = "OK"
except OSError as e:
    out["fd"] = errno.errorcode[e.errno]
try:
    pfd = os.pidfd_open(pid)
    r = libc.syscall(438, pfd, 3, 0)  # pidfd_getfd
    out["pidfd_getfd"] = errno.errorcode.get(ctypes.get_errno(), "OK") if r < 0 else "OK"
except OSError as e:
    out["pidfd_getfd"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def test_owner_cannot_ptrace_or_read_their_qemu(kg: Kvmgate, alice: str, running: int) -> None:
    r = as_user(alice, ["/usr/bin/python3", "-c", PROBE, str(running)])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"ptrace": "EPERM", "mem": "EACCES", "environ": "EACCES", "fd": "EACCES", "pidfd_getfd": "EPERM"}


# 13. /dev/kvm and direct QEMU.
def test_users_cannot_open_dev_kvm_or_run_qemu_with_kvm(kg: Kvmgate, alice: str, unchanged: None) -> None:
    r = as_user(alice, ["/usr/bin/python3", "-c", "import os; os.open('/dev/kvm', os.O_RDWR)"])
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_user(alice, ["/usr/bin/python3", "-c", "import os; os.open('/dev/net/tun', os.O_RDWR)"])
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_user(alice, ["qemu-system-x86_64", "-accel", "kvm", "-display", "none", "-nodefaults", "-S"], timeout=30)
    assert r.returncode != 0 and "failed to initialize kvm: Permission denied" in r.stderr


# 14. The monitor, QMP and console sockets belong to root.
def test_users_cannot_reach_qmp_or_console(kg: Kvmgate, alice: str, bob: str, running: int) -> None:
    key = kg.json("status", "target", "--owner", alice)["key"]
    for who in (alice, bob):
        for sock in ("qmp.sock", "console.sock"):
            code = f"import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect({os.path.join(RUN, key, sock)!r})"
            r = as_user(who, ["/usr/bin/python3", "-c", code])
            assert r.returncode != 0 and "PermissionError" in r.stderr, (who, sock)
    assert not any("qmp" in t or "monitor" in t for t in fd_targets(running) if t.startswith("/"))


# 18. Memory: the cgroup holds QEMU to -m plus the documented overhead.
def test_memory_is_capped_by_the_cgroup(kg: Kvmgate, alice: str, running: int) -> None:
    kg.ok("console", "target", "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    # The guest fills its RAM (tmpfs in the initramfs); QEMU's charge must stay under the limit.
    kg(
        "console",
        "target",
        "--expect",
        "filled",
        "--timeout",
        "60",
        user=alice,
        input="dd if=/dev/zero of=/fill bs=1M count=400 2>/dev/null; echo fil''led\n",
    )
    line = next(ln for ln in Path(f"/proc/{running}/cgroup").read_text().splitlines() if ":memory:" in ln)
    cg = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2])
    limit = int((cg / "memory.limit_in_bytes").read_text())
    peak = int((cg / "memory.max_usage_in_bytes").read_text())
    assert limit == (256 + 128 + 256) << 20  # -m 256, TCG's translation cache, the overhead
    assert peak <= limit
    assert int((cg / "memory.usage_in_bytes").read_text()) > 100 << 20, "the guest's memory is charged here"


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _session_of(pid: int) -> int:
    return int(_stat(pid)[3])


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return _stat(pid)[0] != "Z"
    return False


def _members(sid: int) -> set[int]:
    """The live processes of session sid."""
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if _session_of(int(p.name)) == sid and _alive(int(p.name)):
                    out.add(int(p.name))
    return out


def _end_session(sid: int) -> None:
    """Log the session out the hard way: SIGHUP to every process in it, then SIGKILL to what is left."""
    for sig in (signal.SIGHUP, signal.SIGKILL):
        members = _members(sid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if members:
            time.sleep(0.5)


def test_vm_survives_the_end_of_the_callers_session(
    kg: Kvmgate, alice: str, vm_name: str, guest: Path, cleanup_vms: list[tuple[str, str]]
) -> None:
    """alice starts her VM from a login session of her own (su -l on a terminal of
    its own), then the session ends: her shell and everything left in the session
    get SIGHUP, then SIGKILL. Her QEMU keeps running and she still controls it."""
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "16M", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    leader, term = os.forkpty()  # the child leads a new session, with the terminal as its controlling tty
    if leader == 0:
        try:
            os.execv("/bin/su", ["su", "-l", alice])
        finally:
            os._exit(127)
    try:
        os.write(term, f"{KVMGATE} start {vm_name} && echo VM-STA''RTED-$$\n".encode())
        seen, deadline = b"", time.monotonic() + 120
        while not (m := re.search(rb"VM-STARTED-(\d+)", seen)) and time.monotonic() < deadline:
            if select.select([term], [], [], 1)[0]:
                seen += os.read(term, 4096)
        assert m, seen.decode(errors="replace")
        shell = int(m[1])
        assert _session_of(shell) == leader, "the shell that ran kvmgate is in the login session"
        st = kg.json("status", vm_name, user=alice)
        assert st["state"] == "running"
        pid = st["pid"]
        assert _session_of(pid) != leader

        _end_session(leader)
        os.close(term)  # the terminal hangs up too
        term = -1
        os.waitpid(leader, 0)
        assert not _members(leader), "the session is over"

        assert _alive(pid) and Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"), "QEMU outlives it"
        st = kg.json("status", vm_name, user=alice)
        assert (st["state"], st["pid"], st.get("qemu_status")) == ("running", pid, "running")  # QMP answers
        kg.ok("stop", vm_name, "--force", user=alice)
    finally:
        if term >= 0:
            os.close(term)
        with contextlib.suppress(ChildProcessError):
            _end_session(leader)
            os.waitpid(leader, 0)


def test_tap_device_is_not_users(kg: Kvmgate, alice: str, unchanged: None) -> None:
    r = as_user(alice, ["ip", "tuntap", "add", "dev", "kgevil0", "mode", "tap"])
    assert r.returncode != 0
    assert subprocess.run(["ip", "link", "show", "kgevil0"], capture_output=True).returncode != 0


def test_refusals_are_audited(kg: Kvmgate, bob: str, alice_vm: str) -> None:
    kg("start", alice_vm, "--", "-m", "9999", user=bob)
    lines = [json.loads(ln) for ln in Path("/opt/kvmgate-test/log/audit.log").read_text().splitlines()]
    last = lines[-1]
    assert (last["caller"], last["verb"], last["vm"], last["outcome"], last["exit"]) == (
        bob,
        "start",
        alice_vm,
        "refused",
        4,
    )
    assert last["options"] == ["-m", "9999"]
    assert os.stat("/opt/kvmgate-test/log/audit.log").st_mode & 0o077 == 0
