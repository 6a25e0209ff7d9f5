"""`-s` and `-p` (QEMU's gdb stub) can never be enabled. The stub passes gdb's
`monitor` command to QEMU's human monitor: whoever holds it can add NICs, open
public host ports and change everything the administrator fixed (found by
attacking an owner-only stub socket). So the policy refuses them in every list,
and no start can carry them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import DEFAULT_POLICY, Kvmgate, boot_options


@pytest.mark.parametrize("lists", ['admin = ["-s"]', 'admin = ["-p"]', 'user = ["-s", "-p"]'])
def test_no_policy_can_enable_a_gdb_stub(kg: Kvmgate, alice: str, guest: Path, lists: str) -> None:
    kg.write_policy(DEFAULT_POLICY + f"[lists]\n{lists}\n")
    r = kg("admin", "create", "gdbvm", "--owner", alice, "--", *boot_options(guest))
    assert r.returncode == 3 and "cannot be enabled: a gdb stub hands its holder QEMU's monitor" in r.stderr


@pytest.mark.parametrize("option", [["-s"], ["-p", "23456"]])
def test_a_gdb_stub_is_refused_to_admin_and_owner(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path, option: list[str]
) -> None:
    before = kg.state_snapshot()
    r = kg("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest), *option)
    assert r.returncode == 3 and r.stderr.startswith(f"kvmgate: {option[0]}: ")
    assert kg.state_snapshot() == before
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    before = kg.state_snapshot()
    r = kg("start", vm_name, "--", *option, user=alice)
    assert r.returncode == 3 and r.stderr.startswith(f"kvmgate: {option[0]}: ")
    assert kg.state_snapshot() == before
