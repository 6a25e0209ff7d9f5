"""Attacks through what the caller controls besides arguments: environment,
inherited file descriptors, umask and resource limits."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from ..conftest import QEMU_UNDER_TEST, RUN, STATE, Kvmgate, as_user
from .conftest import fd_targets, home

MARKER_LIB = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char comm[64] = {0}, path[256];
    int fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) { read(fd, comm, sizeof comm - 1); close(fd); }
    comm[strcspn(comm, "\n")] = 0;
    if (geteuid() == 0 || strncmp(comm, "qemu", 4) == 0) {
        snprintf(path, sizeof path, "%s/marker-%d-%s", MARKDIR, (int)geteuid(), comm);
        close(open(path, O_CREAT | O_WRONLY, 0666));
    }
}
"""


@pytest.fixture
def attack_dir(alice: str, tmp_path: Path) -> Path:
    d = Path("/tmp") / f"kgattack-{alice}"
    d.mkdir(mode=0o777, exist_ok=True)
    d.chmod(0o777)
    yield d
    subprocess.run(["rm", "-rf", str(d)])


def qemu_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if e)


def test_environment_never_reaches_root_or_qemu(kg: Kvmgate, alice: str, alice_vm: str, attack_dir: Path) -> None:
    lib = attack_dir / "mark.so"
    src = attack_dir / "mark.c"
    src.write_text(MARKER_LIB)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKDIR="{attack_dir}"', "-o", str(lib), str(src)], check=True)
    pydir = attack_dir / "py"
    pydir.mkdir()
    for mod in ("sitecustomize.py", "os.py", "json.py", "re.py"):
        (pydir / mod).write_text(f"open('{attack_dir}/marker-python-{mod}', 'w').close()\n")
    (attack_dir / "startup.py").write_text(f"open('{attack_dir}/marker-startup', 'w').close()\n")
    bindir = attack_dir / "bin"
    bindir.mkdir()
    for prog in ("qemu-system-x86_64", "sudo", "python3", "visudo"):
        (bindir / prog).write_text(f"#!/bin/sh\ntouch {attack_dir}/marker-path-{prog}\nexit 0\n")
        (bindir / prog).chmod(0o755)
    fakehome = attack_dir / "home"
    (fakehome / ".config").mkdir(parents=True)
    env = {
        "LD_PRELOAD": str(lib),
        "LD_LIBRARY_PATH": str(attack_dir),
        "PYTHONPATH": str(pydir),
        "PYTHONSTARTUP": str(attack_dir / "startup.py"),
        "PYTHONHOME": str(attack_dir),
        "PYTHONINSPECT": "1",
        "QEMU_MODULE_DIR": str(attack_dir),
        "QEMU_AUDIO_DRV": "wav",
        "TMPDIR": str(attack_dir),
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(fakehome),
        "SUDO_UID": "0",
        "SUDO_USER": "root",
        "USER": alice,
        "LOGNAME": alice,
        "IFS": "/",
        "ENV": str(attack_dir / "startup.py"),
    }
    kvmgate = os.path.realpath("/opt/kvmgate-test/bin/kvmgate")
    r = as_user(alice, ["/usr/bin/python3", "-IS", kvmgate, "start", alice_vm, "--paused"], env=env)
    assert r.returncode == 0, r.stderr
    try:
        pid = kg.json("status", alice_vm, user=alice)["pid"]
        env_q = qemu_env(pid)
        assert set(env_q) == {"PATH", "TMPDIR", "HOME", "LC_ALL"}
        assert env_q["PATH"] == "/usr/bin:/bin" and env_q["TMPDIR"].startswith(STATE) and env_q["LC_ALL"] == "C"
        assert env_q["HOME"] == env_q["TMPDIR"]
        assert not any(str(attack_dir) in t for t in fd_targets(pid))
        assert Path(f"/proc/{pid}/exe").resolve() == Path(QEMU_UNDER_TEST)
    finally:
        kg.ok("stop", alice_vm, "--force", user=alice)
    markers = sorted(p.name for p in attack_dir.iterdir() if p.name.startswith("marker"))
    assert markers == [], markers


def test_inherited_fds_never_reach_qemu(kg: Kvmgate, alice: str, alice_vm: str, attack_dir: Path) -> None:
    opener = (
        "import os, subprocess, sys\n"
        f"fds = [os.open({str(attack_dir)!r} + f'/leak-{{i}}', os.O_CREAT | os.O_RDWR, 0o600) for i in range(3, 61)]\n"
        "for fd in fds: os.set_inheritable(fd, True)\n"
        "r = subprocess.run(sys.argv[1:], close_fds=False)\n"
        "sys.exit(r.returncode)\n"
    )
    r = as_user(
        alice, ["/usr/bin/python3", "-c", opener, "/opt/kvmgate-test/bin/kvmgate", "start", alice_vm, "--paused"]
    )
    assert r.returncode == 0, r.stderr
    try:
        pid = kg.json("status", alice_vm, user=alice)["pid"]
        targets = fd_targets(pid)
        assert not any("leak-" in t for t in targets)
        assert all(not t.startswith(str(home(alice))) for t in targets)
    finally:
        kg.ok("stop", alice_vm, "--force", user=alice)


def _world_writable(root: str) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o002:
                bad.append(p)
    return bad


def test_umask_and_soft_rlimits_do_not_leak(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    script = (
        f"umask 000; ulimit -S -n 32; ulimit -S -f 1; ulimit -S -c unlimited; ulimit -S -u 200; "
        f"exec /opt/kvmgate-test/bin/kvmgate start {alice_vm} --paused"
    )
    r = as_user(alice, ["/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    try:
        pid = kg.json("status", alice_vm, user=alice)["pid"]
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max file size             unlimited" in limits
        assert "Max core file size        0" in limits
        assert "Max open files            4096" in limits
        assert _world_writable(STATE) == [] and _world_writable(RUN) == []
        for name in ("qmp.sock", "console.sock"):
            key = kg.json("status", alice_vm, "--owner", alice)["key"]
            assert stat.S_IMODE(os.stat(f"{RUN}/{key}/{name}").st_mode) & 0o077 == 0
    finally:
        kg.ok("stop", alice_vm, "--force", user=alice)


def test_hard_file_size_limit_is_refused_or_reset(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    before = kg.state_snapshot()
    r = as_user(
        alice, ["/bin/sh", "-c", f"ulimit -H -f 1; exec /opt/kvmgate-test/bin/kvmgate start {alice_vm} --paused"]
    )
    if r.returncode == 0:  # root could raise the limit again (CAP_SYS_RESOURCE)
        pid = kg.json("status", alice_vm, user=alice)["pid"]
        assert "Max file size             unlimited" in Path(f"/proc/{pid}/limits").read_text()
        kg.ok("stop", alice_vm, "--force", user=alice)
    else:
        assert r.returncode == 3 and "resource limits" in r.stderr
        assert kg.state_snapshot() == before
