"""What an owner plants in their VM's directory: root never follows their links
to learn anything, and one owner's broken VM never stops root's loops over
everyone's VMs (hardening 17, 18)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from ..conftest import LOG, STATE, Kvmgate, boot_options, discard, qemu_pids


def _disks(kg: Kvmgate, owner: str, name: str) -> Path:
    return Path(kg.json("admin", "show", name, "--owner", owner)["default_disk"]).parent  # type: ignore[index]


def test_a_link_in_disks_tells_nothing_about_other_paths(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    """The default disk is a link the owner controls. Pointing it at a path in a
    directory they cannot read (one that exists, one that does not) must give the
    same answer: root does not follow it, the owner's own open does."""
    disk = _disks(kg, alice, alice_vm) / "disk0.qcow2"
    saved = disk.with_name("kept.qcow2")
    kg("stop", alice_vm, "--owner", alice, "--force")
    subprocess.run(["runuser", "-u", alice, "--", "mv", str(disk), str(saved)], check=True)
    answers = []
    try:
        for target in ("/root/.bashrc", "/root/no-such-file"):
            subprocess.run(["runuser", "-u", alice, "--", "ln", "-sfn", target, str(disk)], check=True)
            r = kg("start", alice_vm, user=alice)
            answers.append((r.returncode, r.stderr.replace(target, "TARGET")))
    finally:
        subprocess.run(["runuser", "-u", alice, "--", "mv", "-f", str(saved), str(disk)], check=True)
        kg("stop", alice_vm, "--owner", alice, "--force")
    assert answers[0] == answers[1], answers
    assert answers[0][0] == 3, answers


def test_one_owners_broken_vm_never_stops_autostart(kg: Kvmgate, guest: Path) -> None:
    """A default disk linked to a running executable (ETXTBSY when opened for
    writing) once aborted `admin autostart` for every VM after it."""
    first, second = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    busy = Path("/var/tmp", f"kgbusy-{secrets.token_hex(3)}")
    for name in (first, second):
        kg.ok("admin", "create", name, "--service", "--disk-size", "16M", "--", *boot_options(guest))
    shutil.copy("/bin/sleep", busy)
    shutil.chown(busy, "kvmgate-svc")
    busy.chmod(0o755)
    runner = subprocess.Popen([str(busy), "60"])
    try:
        disk = _disks(kg, "kvmgate-svc", first) / "disk0.qcow2"
        disk.unlink()
        disk.symlink_to(busy)
        os.lchown(disk, *(lambda st: (st.st_uid, st.st_gid))(os.stat(disk.parent)))
        r = kg("admin", "autostart")
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"autostart kvmgate-svc/{first}:" in r.stderr and "Traceback" not in r.stderr
        st = kg.json("status", second, "--owner", "kvmgate-svc")
        assert st["state"] == "running" and st["pid"] in qemu_pids(), "the VM after it started"  # type: ignore[index]
    finally:
        runner.kill()
        runner.wait()
        for name in (first, second):
            discard(kg, "kvmgate-svc", name)
        busy.unlink(missing_ok=True)
    assert not any(p.name.startswith(".del-") for p in Path(STATE, "vms").iterdir())


DEEP = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for _ in range(int(sys.argv[2])):
    os.mkdir("d", dir_fd=fd)
    sub = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = sub
"""


def test_a_deep_tree_in_disks_never_breaks_a_delete(kg: Kvmgate, alice: str, guest: Path) -> None:
    """3,000 nested directories in disks/ once made `admin delete` fail half-way
    (RecursionError) with the owner's data left in vms/.del-*, nothing audited
    and the network not synced."""
    name = f"deep{secrets.token_hex(3)}"
    kg.ok("admin", "create", name, "--owner", alice, "--disk-size", "16M", "--", *boot_options(guest))
    disks = _disks(kg, alice, name)
    subprocess.run(["runuser", "-u", alice, "--", "/usr/bin/python3", "-c", DEEP, str(disks), "3000"], check=True)
    audit_before = Path(LOG, "audit.log").read_text()
    r = kg("admin", "delete", name, "--owner", alice)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"deleted {alice}/{name}\n"
    assert not [p for p in Path(STATE, "vms").iterdir() if p.name.startswith(".del-")]
    new = Path(LOG, "audit.log").read_text()[len(audit_before) :]
    assert '"verb": "admin delete"' in new and '"files_removed": true' in new
    assert '"verb": "admin delete: network freed"' in new
