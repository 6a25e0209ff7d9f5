"""The note's second logon path through real PAM logins (sshd on loopback, key
authentication): the VM is thawed at a user's first logon and frozen or
hibernated at their last logoff; crashed sessions are reaped."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, KVMGATE, LOG, PREFIX, Kvmgate, Pause, boot_options
from .test_ssh_logon import Sshd

HOOK = f"{PREFIX}/lib/kvmgate/kvmgate-pam"
START = f"{PREFIX}/lib/kvmgate/kvmgate-pam-start"


@pytest.fixture(scope="module")
def pam(kg: Kvmgate) -> Iterator[None]:
    out = kg.ok("admin", "init", "--pam").stdout
    assert "/etc/pam.d/sshd now runs" in out or "/etc/pam.d/sshd already runs" in out
    sshd_stack = Path("/etc/pam.d/sshd").read_text()
    assert f"type=open_session {START} sshd open" in sshd_stack
    assert f"type=close_session {START} sshd close" in sshd_stack
    yield
    kg.ok("admin", "init", "--no-pam")
    for name in ("sshd", "login", "common-session"):
        assert "kvmgate-test" not in Path("/etc/pam.d", name).read_text()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, pam: None) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("sshd-logon")
    d.chmod(0o700)
    s = Sshd(d)
    yield s
    s.stop()


@pytest.fixture
def user_vm(
    kg: Kvmgate, users, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list, request: pytest.FixtureRequest
) -> tuple[str, str]:
    mode = request.param
    user = users.make("kgl")
    sshd.authorize(user)
    # The logoff delay (default 60 s) has its own tests below; these act at once.
    kg.ok(
        "admin", "create", vm_name, "--owner", user, "--on-logoff", mode, "--logoff-delay", "0",
        "--", *boot_options(guest),
    )  # fmt: skip
    cleanup_vms.append((user, vm_name))
    kg.ok("start", vm_name, "--owner", user)
    kg.ok("console", vm_name, "--owner", user, "--expect", BOOT_LINE, "--timeout", "90")
    kg.ok("freeze", vm_name, "--owner", user)
    return user, vm_name


def wait_state(kg: Kvmgate, user: str, name: str, want: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        st = kg.json("status", name, "--owner", user)
        if st["state"] == want or time.monotonic() > deadline:
            return st  # type: ignore[no-any-return]
        time.sleep(0.1)


def in_session(sshd: Sshd, user: str, name: str, command: str, expect: str) -> str:
    r = sshd.run(
        user,
        f"printf '\\n{command}\\n' | {KVMGATE} console {name} --expect '{expect}' --timeout 30; "
        f"{KVMGATE} status {name} --json",
    )
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_pause_policy(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    user, name = user_vm
    out = in_session(sshd, user, name, 'echo pam-marker > /m; echo wr""ote', "wrote")
    assert '"state": "running"' in out, "thawed at logon"
    st = wait_state(kg, user, name, "paused")
    assert st["state"] == "paused" and st["qemu_status"] == "paused", "frozen at logoff"
    out = in_session(sshd, user, name, "cat /m", "pam-marker")
    assert '"state": "running"' in out
    assert wait_state(kg, user, name, "paused")["state"] == "paused"


@pytest.mark.parametrize("user_vm", ["hibernate"], indirect=True)
def test_hibernate_policy(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    user, name = user_vm
    out = in_session(sshd, user, name, 'echo hib-marker > /m; echo up=$(cut -d" " -f1 /proc/uptime)', "up=[0-9.]+\\s")
    before = float(re.findall(r"up=([0-9.]+)", out)[-1])
    pid = int(re.findall(r'"pid": ([0-9]+)', out)[-1])
    st = wait_state(kg, user, name, "hibernated")
    assert st["state"] == "hibernated", st
    assert not Path(f"/proc/{pid}/exe").exists(), "QEMU is gone while the user is away"
    time.sleep(2)
    out = in_session(sshd, user, name, 'cat /m; echo up=$(cut -d" " -f1 /proc/uptime)', "up=[0-9.]+\\s")
    after = float(re.findall(r"up=([0-9.]+)", out)[-1])
    assert "hib-marker" in out and before <= after < before + 1.5, (before, after)


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_two_sessions(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    user, name = user_vm
    long = sshd.popen(user, "sleep 60")
    try:
        assert wait_state(kg, user, name, "running")["state"] == "running"
        r = sshd.run(user, "true")  # a second session opens and closes
        assert r.returncode == 0
        time.sleep(2)
        assert kg.json("status", name, "--owner", user)["state"] == "running", "one session is still open"
    finally:
        long.terminate()
        long.wait()
    assert wait_state(kg, user, name, "paused")["state"] == "paused"


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_crashed_session_is_reaped(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    user, name = user_vm
    long = sshd.popen(user, "sleep 60")
    try:
        assert wait_state(kg, user, name, "running")["state"] == "running"
        leaders = [int(n.split("-")[0]) for n in os.listdir(f"/run/kvmgate-test/sessions/{user}")]
        for pid in leaders:  # the session's sshd dies without closing its PAM session
            os.kill(pid, signal.SIGKILL)
    finally:
        long.kill()
        long.wait()
    time.sleep(0.5)
    assert kg.json("status", name, "--owner", user)["state"] == "running"
    assert f"reaped the sessions of {user}" in kg.ok("admin", "reap").stdout
    assert wait_state(kg, user, name, "paused")["state"] == "paused"


@pytest.mark.parametrize("user_vm", ["hibernate"], indirect=True)
def test_broken_kvmgate_never_breaks_a_login(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    user, name = user_vm
    kg.ok("hibernate", name, "--owner", user)
    policy = Path("/opt/kvmgate-test/etc/policy.toml")
    policy.chmod(0o666)  # kvmgate refuses a policy file others can write: restores fail
    try:
        r = sshd.run(user, "echo logged-in")
        assert r.returncode == 0 and "logged-in" in r.stdout
        time.sleep(1)
        assert kg.json("status", name, "--owner", user)["state"] == "hibernated", "nothing was lost"
        audit = Path(LOG, "audit.log").read_text()
        assert "must be owned by root and not writable by others" in audit
    finally:
        policy.chmod(0o644)
    r = sshd.run(user, "echo again")  # with kvmgate fixed, the next logon restores the VM
    assert r.returncode == 0
    deadline = time.monotonic() + 30
    while f'"verb": "restore", "vm": "{name}"' not in Path(LOG, "audit.log").read_text():
        assert time.monotonic() < deadline, "the VM was not restored at the next logon"
        time.sleep(0.2)


@pytest.mark.parametrize("user_vm", ["hibernate"], indirect=True)
def test_logoff_then_immediate_logon(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    """The logoff's hibernate and the next logon's restore race; the user must end up with a running VM."""
    user, name = user_vm
    first = sshd.popen(user, "sleep 60")
    assert wait_state(kg, user, name, "running")["state"] == "running"
    first.terminate()
    second = sshd.popen(user, "sleep 60")
    try:
        first.wait()
        time.sleep(8)  # let both workers finish, in whatever order they were spawned
        assert wait_state(kg, user, name, "running")["state"] == "running"
    finally:
        second.terminate()
        second.wait()
    assert wait_state(kg, user, name, "hibernated")["state"] == "hibernated"


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_pam_environment_cannot_speak_for_another_user(
    kg: Kvmgate, users, sshd: Sshd, user_vm: tuple[str, str]
) -> None:
    """sshd's stack runs pam_env user_readenv=1: what a user writes in
    ~/.pam_environment is in the hook's environment, in front of pam_exec's own
    PAM_* items. An attacker names the victim in PAM_USER (and SUDO_UID, and a
    PAM_TYPE), logs on and off: the victim's VM stays frozen, no session is
    recorded for the victim, and the audit log never names the victim as caller."""
    victim, name = user_vm
    attacker = users.make("kga")
    sshd.authorize(attacker)
    uid = pwd.getpwnam(victim).pw_uid
    env = Path(pwd.getpwnam(attacker).pw_dir, ".pam_environment")
    audit_before = Path(LOG, "audit.log").read_text()
    for kind in ("open_session", "close_session"):
        env.write_text(f"PAM_USER DEFAULT={victim}\nPAM_TYPE DEFAULT={kind}\nSUDO_UID DEFAULT={uid}\n")
        os.chown(env, pwd.getpwnam(attacker).pw_uid, -1)
        r = sshd.run(attacker, "echo $PAM_USER; sleep 1")
        assert r.returncode == 0 and victim in r.stdout, "the environment really named the victim"
        time.sleep(2)
        assert kg.json("status", name, "--owner", victim)["state"] == "paused"
        records = Path(f"/run/kvmgate-test/sessions/{victim}")
        assert not records.is_dir() or not os.listdir(records), "no session was recorded for the victim"
    new = Path(LOG, "audit.log").read_text()[len(audit_before) :]
    assert f'"caller": "{victim}"' not in new and f'"uid": {uid}' not in new


MARKER = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char p[256];
    snprintf(p, sizeof p, "%s/ran-as-%d-pid-%d", MARKDIR, (int)geteuid(), (int)getpid());
    FILE *f = fopen(p, "w");
    if (f) fclose(f);
}
"""


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_pam_environment_never_runs_code_in_the_hook(
    kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str], tmp_path: Path
) -> None:
    """pam_exec runs the hook as root with the PAM environment, and pam_env
    (user_readenv=1) fills it from ~/.pam_environment. An LD_PRELOAD there ran the
    user's library as root in the dynamically linked hook. The hook now starts from
    a static shell that empties the environment: the library runs in the user's own
    processes only, and the VM is still thawed at the logon."""
    user, name = user_vm
    pw = pwd.getpwnam(user)
    marks = Path(pw.pw_dir, "marks")
    marks.mkdir(mode=0o777, exist_ok=True)
    marks.chmod(0o777)
    lib = Path(pw.pw_dir, "mark.so")
    src = tmp_path / "mark.c"
    src.write_text(MARKER)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKDIR="{marks}"', "-o", str(lib), str(src)], check=True)
    lib.chmod(0o755)
    env = Path(pw.pw_dir, ".pam_environment")
    env.write_text(
        f"LD_PRELOAD DEFAULT={lib}\nLD_LIBRARY_PATH DEFAULT={pw.pw_dir}\nGLIBC_TUNABLES DEFAULT=glibc.malloc.check=3\n"
    )
    os.chown(env, pw.pw_uid, -1)
    try:
        r = sshd.run(user, "echo $LD_PRELOAD; sleep 1")
        assert r.returncode == 0 and str(lib) in r.stdout, "the environment really carried the library"
        time.sleep(2)
        ran = sorted(p.name for p in marks.iterdir())
        assert any(n.startswith(f"ran-as-{pw.pw_uid}-") for n in ran), "it ran in the user's own processes"
        assert not any(n.startswith("ran-as-0-") for n in ran), f"it ran as root: {ran}"
        assert kg.json("status", name, "--owner", user)["state"] in ("running", "paused")
    finally:
        env.unlink()


@pytest.mark.parametrize("user_vm", ["pause"], indirect=True)
def test_logons_behind_a_held_lock_never_pile_up_workers(kg: Kvmgate, sshd: Sshd, user_vm: tuple[str, str]) -> None:
    """Every logon and logoff once spawned its own worker, each waiting for the VM's
    lock: behind a lock held long, a process per login piled up. A user has one
    worker at a time, which takes the newest request when it gets the lock."""
    user, name = user_vm
    key = hashlib.sha256(f"{user}\0{name}".encode()).hexdigest()[:32]
    with Pause(f"lock:vm-{key}") as pause:
        holder = subprocess.Popen([KVMGATE, "freeze", name, "--owner", user], stdout=subprocess.DEVNULL)
        pause.reached()
        for i in range(6):  # six one-shot logins: six logons and six logoffs
            assert sshd.run(user, f"echo {i}").returncode == 0
        time.sleep(1)
        # The user's workers hold RUN/logon-work/<user> open (the spool's worker, which
        # only counts sessions, holds the spool): at most one, whatever the logins.
        work = f"/run/kvmgate-test/logon-work/{user}"
        workers = [p for p in _pids() if HOOK in _cmdline(p) and work in _fds(p)]
        assert len(workers) <= 1, [_cmdline(p) for p in workers]
        pause.release()
        assert holder.wait(30) == 0
    assert wait_state(kg, user, name, "paused")["state"] == "paused", "the newest request (logoff) won"
    deadline = time.monotonic() + 30
    while any(HOOK in _cmdline(p) for p in _pids()):
        assert time.monotonic() < deadline, "the worker finished"
        time.sleep(0.2)


def _fds(pid: int) -> set[str]:
    try:
        return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return set()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _stopped_vm(
    kg: Kvmgate, user: str, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list, mode: str, delay: str
) -> str:
    """A stopped VM for `user`, who may ssh in, with a logoff policy and delay."""
    sshd.authorize(user)
    kg.ok(
        "admin", "create", vm_name, "--owner", user, "--on-logoff", mode, "--logoff-delay", delay,
        "--", *boot_options(guest),
    )  # fmt: skip
    cleanup_vms.append((user, vm_name))
    return user


def _state(sshd: Sshd, user: str, name: str) -> str:
    r = sshd.run(user, f"{KVMGATE} status {name} --json")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["state"])


def test_one_shot_logins_never_put_the_vm_to_sleep_before_the_delay(
    kg: Kvmgate, users, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    """`ssh host kvmgate start deb` once left the VM paused 3 s later, mid-boot: a
    one-shot ssh is a whole logon and logoff. The policy now acts only after the
    owner has had no session for the logoff delay (here 6 s; 60 s by default),
    and any logon within it cancels it."""
    user = _stopped_vm(kg, users.make("kgd"), sshd, guest, vm_name, cleanup_vms, "pause", "6")
    r = sshd.run(user, f"{KVMGATE} start {vm_name}")  # one-shot: logon, start, logoff
    assert r.returncode == 0, r.stderr
    time.sleep(3)
    assert _state(sshd, user, vm_name) == "running", "a one-shot login 3 s later finds it running"
    for _ in range(6):  # one-shot commands keep coming, 2 s apart, past the delay
        time.sleep(2)
        assert _state(sshd, user, vm_name) == "running", "it never pauses while they keep coming"
    last = time.monotonic()
    assert wait_state(kg, user, vm_name, "paused", 30)["state"] == "paused", "frozen after the delay"
    assert time.monotonic() - last >= 4, "not before the delay"


def test_the_logoff_delay_is_a_policy_default_and_a_vm_setting(
    kg: Kvmgate, users, vm_name: str, cleanup_vms: list
) -> None:
    user = users.make("kgs")
    kg.ok("admin", "create", vm_name, "--owner", user, "--on-logoff", "pause", "--", "-m", "64")
    cleanup_vms.append((user, vm_name))
    shown = kg.ok("admin", "set", vm_name, "--owner", user, "--logoff-delay", "90").stdout
    assert '"logoff_delay": 90' in shown
    r = kg("admin", "set", vm_name, "--owner", user, "--logoff-delay", "1h")
    assert r.returncode == 2 and "--logoff-delay takes seconds" in r.stderr


def test_a_snapshot_vm_is_paused_at_logoff_and_status_says_why(
    kg: Kvmgate, users, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    """With the hibernate policy, a VM started with -snapshot once stayed running at
    logoff (its overlay cannot be saved), with the reason only in the audit log."""
    user = _stopped_vm(kg, users.make("kgn"), sshd, guest, vm_name, cleanup_vms, "hibernate", "0")
    r = sshd.run(user, f"{KVMGATE} start {vm_name} -- -snapshot")
    assert r.returncode == 0, r.stderr
    st = wait_state(kg, user, vm_name, "paused")
    assert st["state"] == "paused", st
    assert st["note"] == "paused at logoff, not hibernated: it runs with -snapshot"
    assert "note: paused at logoff" in kg.ok("status", vm_name, "--owner", user).stdout
    kg.ok("thaw", vm_name, "--owner", user)
    assert "note" not in kg.json("status", vm_name, "--owner", user)
