"""What a user sends may not size root's work or root's files (hardening, first
cases): the audit record of a refusal has a bounded size; an image header that
asks for an impossible overlay is a refusal naming the user's file, not an
internal error."""

from __future__ import annotations

import json
import os
import pwd
import struct
import time
from pathlib import Path

import pytest

from kvmgate.model import qcow2

from ..conftest import BOOT_LINE, DEFAULT_POLICY, KVMGATE, STATE, Kvmgate, as_user, boot_options, popen_as, qemu_pids
from .conftest import give

AUDIT = Path("/opt/kvmgate-test/log/audit.log")


def test_a_huge_refused_request_writes_a_small_audit_record(kg: Kvmgate, bob: str) -> None:
    """Once 120 kB a call, 34 MiB from one loop in 5 s."""
    before = AUDIT.stat().st_size if AUDIT.exists() else 0
    huge = "console=ttyS0 " + "x" * 120_000
    for _ in range(5):
        r = kg("start", "nosuch", "--", "-append", huge, "-append", huge, user=bob)
        assert r.returncode == 4
    grown = AUDIT.stat().st_size - before
    assert grown < 5 * 4096, grown
    rec = json.loads(AUDIT.read_text().splitlines()[-1])
    assert (rec["caller"], rec["verb"], rec["vm"], rec["outcome"]) == (bob, "start", "nosuch", "refused")
    assert rec["options"][0] == "-append" and "120014 characters, sha256 " in rec["options"][1]


def _image(tmp_path: Path, virtual_size: int) -> Path:
    """A small, valid qcow2 file whose header claims `virtual_size`."""
    empty = qcow2.empty_image(1 << 20)
    img = bytearray(empty.head) + bytes(empty.length - len(empty.head))
    struct.pack_into(">Q", img, 24, virtual_size)
    src = tmp_path / f"claims-{virtual_size}.qcow2"
    src.write_bytes(bytes(img))
    return src


def test_an_overlay_the_header_makes_impossible_is_refused(
    kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path, unchanged: None
) -> None:
    """A qcow2 header with a virtual size that is not whole sectors: the -snapshot
    overlay cannot be made for it. Once a ValueError (exit 1)."""
    path = give(alice, _image(tmp_path, 1000), "odd.qcow2")  # virtual size: 1000 bytes
    r = kg("start", alice_vm, "--", "-hdb", str(path), "-snapshot", user=alice)
    assert r.returncode == 3, r.stderr
    assert (
        r.stderr
        == f"kvmgate: {path}: no -snapshot overlay for this image (virtual size must be a positive multiple of 512)\n"
    )


PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


@pytest.mark.parametrize("option", ["-hda", "-hdb", "-fda", "-fdb"])
def test_an_image_above_the_size_limit_is_refused_before_anything_is_built(
    kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path, option: str, unchanged: None
) -> None:
    """A qcow2 header claiming 2^56 bytes once made root allocate ~2 GB for the
    -snapshot overlay and write 1 GiB to an unlinked file. Now the policy's
    limits.image_max_gib (256 GiB) refuses it from the header, before anything is
    allocated: the peak RSS of sudo and the helper stays small."""
    path = give(alice, _image(tmp_path, 1 << 56), "huge.qcow2")
    r = as_user(
        alice, ["/usr/bin/python3", "-c", PEAK_RSS, KVMGATE, "start", alice_vm, "--", option, str(path), "-snapshot"]
    )
    code, peak_kib = map(int, r.stdout.split())
    assert code == 3, r.stderr
    assert r.stderr == (
        f"kvmgate: {path}: its virtual size (67108864 GiB) is above this host's limit of 256 GiB "
        "(limits.image_max_gib)\n"
    )
    assert peak_kib < 100 << 10, f"peak RSS {peak_kib} KiB"


def test_repeated_option_roms_are_bounded_in_count(kg: Kvmgate, alice: str, alice_vm: str, unchanged: None) -> None:
    r = kg("start", alice_vm, "--", *["-option-rom", "/nonexistent"] * 33, user=alice)
    assert r.returncode == 3, r.stderr
    assert "-option-rom: given more than 32 times (limits.repeat_max)" in r.stderr


def test_copied_roms_are_bounded_in_total_before_copying(
    kg: Kvmgate, alice: str, alice_vm: str, users, tmp_path: Path, unchanged: None
) -> None:
    """ROMs the user reads only through a group are copied into memory for QEMU.
    Eight 200 MiB ones once meant 1.6 GB of shared memory; the total is
    limits.blobs_max_mib (1 GiB), checked before each copy."""
    import grp
    import subprocess

    group = f"kgr{alice[-6:]}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["usermod", "-aG", group, alice], check=True)
        rom = Path("/srv") / f"{group}.rom"
        with open(rom, "wb") as f:
            f.truncate(200 << 20)
        os.chown(rom, 0, grp.getgrnam(group).gr_gid)
        rom.chmod(0o640)
        r = as_user(
            alice,
            ["/usr/bin/python3", "-c", PEAK_RSS, KVMGATE, "start", alice_vm, "--", *["-option-rom", str(rom)] * 8],
        )
        assert int(r.stdout.split()[0]) == 3, r.stderr
        assert "would exceed this host's limit for one start" in r.stderr
    finally:
        Path("/srv", f"{group}.rom").unlink(missing_ok=True)
        subprocess.run(["groupdel", group], check=False)


def _is_overlay(link: str) -> bool:
    """An O_TMPFILE overlay in a VM's tmp/ shows as <vm dir>/tmp/#<inode> (deleted)."""
    return link.startswith(f"{STATE}/vms/") and "/tmp/#" in link and link.endswith(" (deleted)")


def test_snapshot_overlays_stop_at_the_policy_bound(kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path) -> None:
    """limits.snapshot_max_mib bounds all of a VM's -snapshot overlays together
    (QEMU's RLIMIT_FSIZE, SIGXFSZ ignored): the guest writing past it gets an
    I/O error, QEMU keeps running, and the overlays in root's state tree stay
    within the bound."""
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
    path = give(alice, raw, "big.raw")
    kg("stop", alice_vm, "--owner", alice, "--force")
    kg.write_policy(DEFAULT_POLICY + "[limits]\nsnapshot_max_mib = 16\n")
    try:
        kg.ok("start", alice_vm, "--", "-hdb", str(path), "-snapshot", user=alice)
        pid = kg.json("status", alice_vm, user=alice)["pid"]
        kg.ok("console", alice_vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
        out = kg.ok(
            "console",
            alice_vm,
            "--expect",
            "dd-exit=[0-9]+",
            "--timeout",
            "120",
            user=alice,
            input="dd if=/dev/zero of=/dev/sdb bs=1M count=48 conv=fsync 2>/dev/null; echo dd-exit=$?\n",
        ).stdout
        assert "dd-exit=0" not in out, out[-2000:]
        assert pid in qemu_pids(), "QEMU kept running"
        by_inode = {
            st.st_ino: st
            for st in (
                os.stat(f"/proc/{pid}/fd/{n}")
                for n in os.listdir(f"/proc/{pid}/fd")
                if _is_overlay(os.readlink(f"/proc/{pid}/fd/{n}"))
            )
        }
        overlays = list(by_inode.values())  # QEMU holds each through more than one fd
        assert len(overlays) == 2, "the default disk's and -hdb's"
        assert sum(st.st_size for st in overlays) <= 16 << 20
        assert sum(st.st_blocks * 512 for st in overlays) <= 16 << 20
    finally:
        kg("stop", alice_vm, "--owner", alice, "--force")
        kg.write_policy(DEFAULT_POLICY)


def test_a_flooding_guest_cannot_grow_its_console_log_or_erase_how_it_began(
    kg: Kvmgate, alice: str, guest: Path, cleanup_vms: list
) -> None:
    """The console log once had no bound but the reaper's, which emptied it, so a
    flood erased everything before it. Now the pump keeps it within the policy's
    console_log_mib as it writes: the boot and what came before the flood stay,
    a line says how much was dropped, the newest output is there; the log
    survives a restore, and the run before a restart stays readable."""
    kg.write_policy("console_log_mib = 1\n" + DEFAULT_POLICY)  # a top-level key: before any [table]
    name = f"flood{os.getpid() % 10000}"
    kg.ok("admin", "create", name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, name))
    kg.ok("start", name, user=alice)
    kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    flood = "echo BEFORE-$((6*7)); yes flood-flood-flood | head -c 3000000; echo; echo AFTER-$((6*7))\n"
    kg.ok("console", name, "--expect", "AFTER-42", "--timeout", "300", input=flood, user=alice)
    log = Path(kg.json("status", name, user=alice)["directory"], "log", "console.log")
    assert log.stat().st_size <= (1 << 20) + (64 << 10) + 100, "within the bound (plus one pipe read)"
    text = kg.ok("log", name, user=alice).stdout
    assert "KVMGATE-GUEST-READY" in text and "BEFORE-42" in text, "how the run began is kept"
    assert "bytes of console output dropped here]" in text and "AFTER-42" in text
    kg.ok("hibernate", name, user=alice)
    kg.ok("start", name, user=alice)
    assert "BEFORE-42" in kg.ok("log", name, user=alice).stdout, "a restore continues the run's log"
    kg.ok("stop", name, "--force", user=alice)
    kg.ok("start", name, user=alice)
    assert "BEFORE-42" in kg.ok("log", name, "--previous", user=alice).stdout, "the last run is kept"
    assert "BEFORE-42" not in kg.ok("log", name, user=alice).stdout
    last = kg.ok("log", name, "--previous", "--lines", "1", user=alice).stdout
    assert last.count("\n") <= 1
    assert kg("log", name, "--lines", "\u0661", user=alice).returncode == 2


def test_reading_a_big_log_costs_root_nothing(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    """`kvmgate log` read the whole log into root's memory (about 200 MB for a
    big ring, split into lines) and then waited, as root, on a caller who never
    read. Now root only opens the log: the helper drops to the caller, finds the
    last lines from the end, and writes a chunk at a time."""
    log = Path(kg.json("status", alice_vm, user=alice)["directory"], "log", "console.prev.log")
    saved = log.read_bytes() if log.exists() else None
    try:
        with log.open("wb") as f:  # as a generous ring (console_log_mib = 64) would leave it
            line = b"x" * 99 + b"\n"
            for _ in range(64):
                f.write(line * ((1 << 20) // 100))
            f.write(b"second-to-last\nthe-last-line\n")
        r = as_user(alice, ["/usr/bin/python3", "-c", PEAK_RSS, KVMGATE, "log", alice_vm, "--previous", "--lines", "2"])
        code, peak_kib = map(int, r.stdout.splitlines()[-1].split())
        assert code == 0 and r.stdout.startswith("second-to-last\nthe-last-line\n0 "), r.stdout[:200]
        assert peak_kib < 60 << 10, f"peak RSS {peak_kib} KiB"
        # A caller who never reads: the process that waits on them is theirs, not root's.
        rfd, wfd = os.pipe()
        p = popen_as(alice, [KVMGATE, "log", alice_vm, "--previous"], stdout=wfd)
        os.close(wfd)
        try:
            time.sleep(3)
            helpers = _helpers("log")
            assert helpers, "the helper is still waiting on its reader"
            uid = pwd.getpwnam(alice).pw_uid
            for pid in helpers:
                status = Path(f"/proc/{pid}/status").read_text()
                uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
                assert set(map(int, uids)) == {uid}, f"the waiting helper runs as {uids}"
        finally:
            p.kill()
            for pid in _helpers("log"):
                os.kill(pid, 9)
            p.wait()
            os.close(rfd)
    finally:
        if saved is None:
            log.unlink(missing_ok=True)
        else:
            log.write_bytes(saved)


def _helpers(verb: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"sudo") and any(a.endswith(b"kvmgate-helper") for a in argv) and verb.encode() in argv:
            found.append(int(d))
    return found
