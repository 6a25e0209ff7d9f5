"""What other users can learn, and what QEMU's refusals say (hardening 4, 5):
a VM's kernel command line is not on QEMU's world-readable command line, and a
QEMU refusal caused by the user's file names that file and exits 3."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, KVMGATE, Kvmgate, as_user, boot_options, discard
from .conftest import home


def test_the_kernel_command_line_is_hidden_from_other_users(
    kg: Kvmgate, alice: str, bob: str, guest: Path, cleanup_vms: list
) -> None:
    """/proc/PID/cmdline is world-readable: an -append secret once showed there."""
    name = f"cmd{secrets.token_hex(3)}"
    kg.ok("admin", "create", name, "--owner", alice, "--", "-m", "256", "-nographic")
    cleanup_vms.append((alice, name))
    secret = f"token={secrets.token_hex(8)}"
    boot = ["-kernel", f"{guest}/vmlinuz", "-initrd", f"{guest}/initrd.img"]
    kg.ok("start", name, "--", *boot, "-append", f"console=ttyS0 quiet {secret}", user=alice)
    pid = kg.json("status", name, user=alice)["pid"]
    seen = as_user(bob, ["cat", f"/proc/{pid}/cmdline"])
    assert seen.returncode == 0 and "qemu-system" in seen.stdout, "bob can read the command line..."
    assert secret not in seen.stdout, "...but not alice's kernel command line"
    assert secret not in as_user(bob, ["ps", "-eo", "args"]).stdout
    kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    out = kg.ok(
        "console", name, "--expect", "token=[0-9a-f]{16}", "--timeout", "30", input="cat /proc/cmdline\n", user=alice
    ).stdout
    assert secret in out, "the guest got it"
    # A line QEMU's config syntax cannot carry stays in argv, and the owner is told so.
    kg.ok("stop", name, "--owner", alice, "--force")
    r = kg.ok("start", name, "--", *boot, "-append", 'console=ttyS0 quiet x="y"', user=alice)
    assert r.stderr == "kvmgate: note: this -append stays on QEMU's command line, which other users can read\n"


@pytest.fixture
def second_vm(kg: Kvmgate, alice: str, guest: Path) -> Iterator[str]:
    name = f"two{secrets.token_hex(3)}"
    kg.ok("admin", "create", name, "--owner", alice, "--", *boot_options(guest))
    yield name
    discard(kg, alice, name)


def test_an_image_another_vm_holds_is_a_refusal_naming_it(
    kg: Kvmgate, alice: str, alice_vm: str, second_vm: str
) -> None:
    """Once: `QEMU failed to start: ... /dev/fdset/7 ...`, exit 1."""
    image = home(alice) / "shared.img"
    subprocess.run(["runuser", "-u", alice, "--", "truncate", "-s", "16M", str(image)], check=True)
    kg("stop", alice_vm, "--owner", alice, "--force")
    try:
        kg.ok("start", alice_vm, "--", "-hdb", str(image), user=alice)
        r = kg("start", second_vm, "--", "-hdb", str(image), user=alice)
        assert r.returncode == 3, r.stderr
        assert r.stderr == f"kvmgate: QEMU refused the VM: {image}: in use by another VM (QEMU could not lock it)\n"
        assert kg.json("status", second_vm, user=alice)["state"] == "stopped"
    finally:
        kg("stop", alice_vm, "--owner", alice, "--force")


def test_a_missing_loadvm_tag_is_a_refusal(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    kg("stop", alice_vm, "--owner", alice, "--force")
    r = kg("start", alice_vm, "--", "-loadvm", "nosuch", user=alice)
    assert r.returncode == 3, r.stderr
    assert r.stderr == "kvmgate: QEMU refused the VM: -loadvm nosuch: no snapshot of that name in the VM's disks\n"
    assert kg.json("status", alice_vm, user=alice)["state"] == "stopped"


def test_a_start_qemu_refused_is_audited_as_refused_and_small(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    """A start's "ok" record, with every option and QEMU's whole argv, was written
    before QEMU answered: a start QEMU then refused left a 36 kB "ok" record, and
    such records escaped the refusal rate limit. Now a start is recorded once QEMU
    answered, as a refusal otherwise, and no record passes 4 KiB."""
    audit = Path("/opt/kvmgate-test/log/audit.log")
    kg("stop", alice_vm, "--owner", alice, "--force")
    before = audit.stat().st_size
    r = kg("start", alice_vm, "--", "-loadvm", "nosuch", user=alice)
    assert r.returncode == 3, r.stderr
    r = kg("start", alice_vm, "--", "-loadvm", "nosuch", "-append", "console=ttyS0 " + "y" * 900, user=alice)
    assert r.returncode == 3, r.stderr
    with audit.open("rb") as f:
        f.seek(before)
        lines = f.read().splitlines()
    mine = [json.loads(line) for line in lines if json.loads(line).get("vm") == alice_vm]
    assert [(m["verb"], m["outcome"], m["exit"]) for m in mine] == [("start", "refused", 3)] * 2, mine
    assert all(len(line) <= 4096 for line in lines), max(map(len, lines))


def test_no_audit_record_passes_4_kib() -> None:
    from kvmgate.host import audit

    event = {"verb": "start", "vm": "v", "options": ["-device", "x" * 500] * 40, "argv": ["y" * 511] * 64}
    line = audit.line_for(event)
    assert len(line) <= audit.MAX_RECORD and json.loads(line)["vm"] == "v"
    assert json.loads(line)["options"][-1] == "...[80 items]"
    # A refusal carries names no grammar has checked yet: still valid JSON, with its whole fields.
    huge = {"time": "t", "uid": 1000, "verb": "status", "owner": "b" * 50000, "vm": "a" * 50000, "reason": "r"}
    line = audit.line_for({**huge, "options": ["x" * 4000] * 64})
    record = json.loads(line)
    assert len(line) <= audit.MAX_RECORD and record["uid"] == 1000 and record["verb"] == "status"
    assert record["vm"].startswith("a" * 256) and "50000 characters" in record["vm"]


def test_guest_output_cannot_drive_an_administrators_terminal(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    """OSC 52 (clipboard), OSC 0 (title), clear-screen and ESC[6n once went raw to
    `kvmgate console --owner`. Root now sees them made visible; the owner, on
    their own VM, still gets their guest's output as it is."""
    kg("stop", alice_vm, "--owner", alice, "--force")
    try:
        kg.ok("start", alice_vm, user=alice)
        kg.ok("console", alice_vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
        sequences = r"printf '\033]52;c;aGk=\007\033]0;owned\007\033[2J\033[6n%s\n' DONE-$((6*7))"
        root = subprocess.run(
            [KVMGATE, "console", alice_vm, "--owner", alice, "--expect", "DONE-42", "--timeout", "30"],
            input=(sequences + "\n").encode(),
            capture_output=True,
            timeout=60,
        )
        assert root.returncode == 0, root.stderr
        assert b"\x1b" not in root.stdout and b"\x07" not in root.stdout
        assert b"^[]52;c;aGk=^G^[]0;owned^G^[[2J^[[6nDONE-42" in root.stdout
        mine = kg.ok("console", alice_vm, "--expect", "DONE-42", "--timeout", "30", user=alice).stdout
        assert "\x1b]52;c;aGk=\x07" in mine, "the owner's own view is untouched"
    finally:
        kg("stop", alice_vm, "--owner", alice, "--force")
