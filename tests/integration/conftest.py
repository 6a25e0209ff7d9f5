"""Fixtures the integration modules share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, Kvmgate, boot_options
from .test_ssh_logon import Sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """sshd on loopback, one per module (a module may override it, as test_logon does)."""
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o700)
    s = Sshd(d)
    yield s
    s.stop()


@pytest.fixture
def vm(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> str:
    """A VM of alice's, booted (the test guest's boot line seen on its console)."""
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    return vm_name
