"""Fixtures for the attack suite: real users, real VMs, and a check that an
attack changed nothing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Kvmgate, boot_options, discard, qemu_pids


def fd_targets(pid: int) -> list[str]:
    d = Path(f"/proc/{pid}/fd")
    return [os.readlink(d / n) for n in os.listdir(d)]


def host_network() -> tuple[str, list[tuple[str, str | None, str | None]]]:
    """The host's nftables ruleset, and its bridges, taps and bridge ports (name, kind, master)."""
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    links = json.loads(subprocess.run(["ip", "-d", "-j", "link"], capture_output=True, text=True, check=True).stdout)
    kept = [
        (ln["ifname"], ln.get("linkinfo", {}).get("info_kind"), ln.get("master"))
        for ln in links
        if ln.get("linkinfo", {}).get("info_kind") in ("bridge", "tun") or "master" in ln
    ]
    return rules, sorted(kept)


@pytest.fixture
def unchanged(kg: Kvmgate) -> Iterator[None]:
    """The attack must leave the state, runtime and log directories, the host's
    firewall rules and bridges and taps, and QEMU processes as they were."""
    before, net, procs = kg.state_snapshot(), host_network(), qemu_pids()
    yield
    assert kg.state_snapshot() == before
    assert host_network() == net
    assert qemu_pids() <= procs  # nothing new started (a stopping QEMU may still be exiting)


def _owned_vm(kg: Kvmgate, owner: str, name: str, guest: Path) -> Iterator[str]:
    discard(kg, owner, name)
    kg.ok("admin", "create", name, "--owner", owner, "--disk-size", "16M", "--", *boot_options(guest))
    yield name
    discard(kg, owner, name)


@pytest.fixture(scope="module")
def alice_vm(kg: Kvmgate, alice: str, guest: Path) -> Iterator[str]:
    yield from _owned_vm(kg, alice, "target", guest)


@pytest.fixture(scope="module")
def bob_vm(kg: Kvmgate, bob: str, guest: Path) -> Iterator[str]:
    yield from _owned_vm(kg, bob, "secret", guest)


@pytest.fixture(scope="module")
def running(kg: Kvmgate, alice: str, alice_vm: str) -> Iterator[int]:
    """alice's VM, started by alice through sudo; yields QEMU's pid."""
    kg("stop", alice_vm, "--owner", alice, "--force")
    kg.ok("start", alice_vm, user=alice)
    pid = kg.json("status", alice_vm, user=alice)["pid"]
    yield pid
    kg("stop", alice_vm, "--owner", alice, "--force")


def home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def give(user: str, src: Path, name: str, mode: int = 0o600) -> Path:
    """Copy src into user's home, owned by them."""
    dst = home(user) / name
    shutil.copy(src, dst)
    pw = pwd.getpwnam(user)
    os.chown(dst, pw.pw_uid, pw.pw_gid)
    dst.chmod(mode)
    return dst
