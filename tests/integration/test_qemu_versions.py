"""A VM hibernated under one QEMU and started under the other: the system's 7.2 and
Debian 13's 10.0 (scripts/fetch-qemu10.sh), switched by the policy's `qemu`, as an
admin upgrading the host would. Both run with the same firmware (migration
compares ROM sizes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, DEFAULT_POLICY, ON_QEMU10, QEMU10, QEMU10_POLICY, REPO, Kvmgate
from .test_hibernate import guest_run, state

pytestmark = pytest.mark.skipif(ON_QEMU10, reason="switches between the two QEMUs itself")

SYSTEM_POLICY = DEFAULT_POLICY
NEW_POLICY = QEMU10_POLICY + DEFAULT_POLICY


@pytest.fixture(scope="module")
def qemu10() -> str:
    import subprocess

    subprocess.run(["sh", str(REPO / "scripts/fetch-qemu10.sh")], check=True, capture_output=True)
    return QEMU10


def _exe(kg: Kvmgate, user: str, name: str) -> str:
    return os.readlink(f"/proc/{state(kg, user, name)['pid']}/exe")


def _cmdline(kg: Kvmgate, user: str, name: str) -> list[str]:
    return Path(f"/proc/{state(kg, user, name)['pid']}/cmdline").read_text().split("\0")


def test_a_vm_hibernated_under_72_resumes_under_100_with_its_machine_type(
    kg: Kvmgate, alice: str, vm: str, qemu10: str
) -> None:
    guest_run(kg, alice, vm, "echo upgrade-marker > /m; echo wr''ote", "wrote")
    kg.ok("hibernate", vm, user=alice)
    saved = Path(state(kg, alice, vm)["directory"], "saved")
    record = json.loads((saved / "state.json").read_text())
    assert record["qemu"].startswith("7.2.") and record["machine"] == "pc-i440fx-7.2", record
    assert state(kg, alice, vm)["saved_by"] == f"QEMU {record['qemu']}, machine pc-i440fx-7.2"

    kg.write_policy(NEW_POLICY)  # the admin moves the host to QEMU 10.0
    assert kg.json("admin", "show", vm, "--owner", alice)["qemu_version"].startswith("10.0.")  # type: ignore[index]
    assert "restored" in kg.ok("start", vm, user=alice).stdout
    assert _exe(kg, alice, vm) == qemu10
    argv = _cmdline(kg, alice, vm)
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2", "the state's machine type, not 10.0's pc"
    guest_run(kg, alice, vm, "cat /m", "upgrade-marker")

    # A later hibernate under 10.0 records 10.0; the older QEMU is then refused clearly, nothing changes.
    kg.ok("hibernate", vm, user=alice)
    record = json.loads((saved / "state.json").read_text())
    assert record["qemu"].startswith("10.0.") and record["machine"] == "pc-i440fx-7.2", record
    kg.write_policy(SYSTEM_POLICY)
    kg.ok("admin", "show", vm, "--owner", alice)  # the policy's cache, refreshed: not part of the refusal
    before = kg.state_snapshot()
    r = kg("start", vm, user=alice)
    assert r.returncode == 5, r.stderr
    assert r.stderr.count("\n") == 1 and f"hibernated under QEMU {record['qemu']}" in r.stderr
    assert f"kvmgate stop {vm} --discard" in r.stderr
    assert kg.state_snapshot() == before
    assert state(kg, alice, vm)["state"] == "hibernated"
    # The way out it names: the state thrown away, the VM boots afresh under 7.2.
    kg.ok("stop", vm, "--discard", user=alice)
    kg.ok("start", vm, user=alice)
    assert _exe(kg, alice, vm) == "/usr/bin/qemu-system-x86_64"
    kg.ok("console", vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)


def test_a_state_without_a_version_is_taken_for_72s(kg: Kvmgate, alice: str, vm: str, qemu10: str) -> None:
    """Records from before versions were kept (version 2 and older) were all written by 7.2."""
    guest_run(kg, alice, vm, "echo old-record > /m; echo wr''ote", "wrote")
    kg.ok("hibernate", vm, user=alice)
    meta = Path(state(kg, alice, vm)["directory"], "saved", "state.json")
    old = {k: v for k, v in json.loads(meta.read_text()).items() if k not in ("qemu", "machine", "version")}
    meta.write_text(json.dumps({**old, "version": 2}))
    kg.write_policy(NEW_POLICY)
    assert "restored" in kg.ok("start", vm, user=alice).stdout
    argv = _cmdline(kg, alice, vm)
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2"
    guest_run(kg, alice, vm, "cat /m", "old-record")


def test_a_qemu_that_cannot_say_its_version_is_a_clear_refusal(kg: Kvmgate, alice: str, vm: str) -> None:
    kg.ok("hibernate", vm, user=alice)
    fake = Path("/opt/kvmgate-test/fake-qemu")
    fake.write_text("#!/bin/sh\necho 'not a QEMU'\n")
    fake.chmod(0o755)
    try:
        kg.write_policy(f'qemu = "{fake}"\n' + DEFAULT_POLICY)
        kg.ok("admin", "show", vm, "--owner", alice)  # the policy's cache, refreshed
        before = kg.state_snapshot()
        r = kg("start", vm, user=alice)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "cannot tell the version of QEMU" in r.stderr
        assert kg.state_snapshot() == before
    finally:
        fake.unlink()
    kg.write_policy(DEFAULT_POLICY)
    assert "restored" in kg.ok("start", vm, user=alice).stdout
