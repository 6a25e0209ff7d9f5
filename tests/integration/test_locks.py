"""The VM operation lock: actors on one VM run one after the other and each sees
what the last one left, and nothing long is done while holding it."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..conftest import BOOT_LINE, KVMGATE, Kvmgate, as_user, boot_options


def boot(kg: Kvmgate, user: str, name: str, cleanup: list, guest: Path, *start: str) -> None:
    kg.ok("admin", "create", name, "--owner", user, "--", *boot_options(guest))
    cleanup.append((user, name))
    kg.ok("start", name, *start, user=user)
    kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "90", user=user)


def test_a_long_stop_does_not_hold_the_vm(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    """A guest without ACPI ignores the power-down: stop waits out its grace time,
    but without the VM's lock, so another operation on the VM goes ahead."""
    boot(kg, alice, vm_name, cleanup_vms, guest, "--", "-no-acpi")
    stop = subprocess.Popen(  # as root: no sudo in between, the same helper path
        [KVMGATE, "stop", vm_name, "--owner", alice, "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2)
    t0 = time.monotonic()
    kg.ok("freeze", vm_name, user=alice)
    assert time.monotonic() - t0 < 10
    out, err = stop.communicate(timeout=60)
    assert stop.returncode == 6 and "killed after timeout" in out, err  # exit 6: done by force
    assert kg.json("status", vm_name, user=alice)["state"] == "stopped"  # type: ignore[index]


def test_parallel_hibernates_and_thaws_leave_one_consistent_state(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    """Hardening finding 7: three hibernates and three thaws of one VM at once once
    lost the saved state and reported success. Under the VM's lock they run one
    after the other: every one ends in a defined way, and the VM is either running
    (and answers) or hibernated (and restores)."""
    boot(kg, alice, vm_name, cleanup_vms, guest)
    kg.ok(
        "console", vm_name, "--expect", "wrote", "--timeout", "30", user=alice, input="echo kept > /m; echo wr''ote\n"
    )

    def call(verb: str) -> subprocess.CompletedProcess[str]:
        return as_user(alice, [KVMGATE, verb, vm_name], timeout=300)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, ["hibernate", "thaw"] * 3))
    for r in results:
        assert r.returncode in (0, 5), (r.returncode, r.stderr)  # done, or nothing to do in the state it found
        assert "internal error" not in r.stderr and r.stderr.count("\n") <= 1
    state = json.loads(as_user(alice, [KVMGATE, "status", vm_name, "--json"]).stdout)["state"]
    assert state in ("running", "hibernated")
    if state == "hibernated":
        assert as_user(alice, [KVMGATE, "start", vm_name]).stdout.startswith("restored")
    out = kg.ok(
        "console", vm_name, "--expect", "k[e]pt-back", "--timeout", "60", user=alice, input="echo $(cat /m)-back\n"
    )
    assert "kept-back" in out.stdout  # the guest's memory survived whatever order they ran in


def test_network_changes_of_a_running_vm_are_refused(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    boot(kg, alice, vm_name, cleanup_vms, guest)
    before = kg.json("admin", "show", vm_name, "--owner", alice)
    r = kg("admin", "set", vm_name, "--owner", alice, "--forward", "ssh")
    assert r.returncode == 5 and "stop it to change its networks or ports" in r.stderr
    after = kg.json("admin", "show", vm_name, "--owner", alice)
    assert after["forwards"] == before["forwards"] == []  # type: ignore[index]
    kg.ok("admin", "set", vm_name, "--owner", alice, "--on-logoff", "pause")  # what does not touch the host


def test_root_lists_every_owners_vms(
    kg: Kvmgate, alice: str, bob: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    for owner in (alice, bob):
        kg.ok("admin", "create", vm_name, "--owner", owner, "--", *boot_options(guest))
        cleanup_vms.append((owner, vm_name))
    owners = {r["owner"] for r in kg.json("list") if r["name"] == vm_name}  # type: ignore[union-attr]
    assert owners == {alice, bob}
    assert {r["owner"] for r in kg.json("list", user=alice)} == {alice}  # type: ignore[union-attr]
