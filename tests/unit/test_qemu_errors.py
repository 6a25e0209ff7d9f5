"""model.qemu_errors: QEMU's refusals (messages as QEMU 7.2 writes them) told
with the user's option and file instead of /dev/fdset/N and node names."""

from __future__ import annotations

from kvmgate.model import translate
from kvmgate.model.policy.policy import Policy
from kvmgate.model.qemu_errors import explain

TS = "2026-11-30T23:40:01.123456Z qemu-system-x86_64: "


def plan(*user: str) -> translate.Plan:
    p = Policy()
    ctx = translate.Context(accel="tcg")
    return translate.translate([*p.parse(["-m", "256"], "admin"), *p.parse(list(user), "user")], ctx)


def fd_of(pl: translate.Plan, of: str, kind: str = "disk") -> int:
    return next(r.fd for r in pl.resources if r.kind == kind and r.of == of)


def test_a_locked_image_names_the_users_file() -> None:
    pl = plan("-hda", "/home/a/d.qcow2", "-hdb", "/home/a/e.img")
    fd = fd_of(pl, "hdb")
    blockdev = '{"driver":"file","filename":"/dev/fdset/FD","node-name":"hdb-file","read-only":false}'
    tail = [
        f'{TS}-blockdev {blockdev.replace("FD", str(fd))}: Failed to get "write" lock',
        f"Is another process using the image [/dev/fdset/{fd}]?",
    ]
    assert explain(tail, pl) == "/home/a/e.img: in use by another VM (QEMU could not lock it)"


def test_a_bad_header_names_the_option_and_file() -> None:
    pl = plan("-hda", "/home/a/d.qcow2")
    blockdev = '{"backing":null,"driver":"qcow2","file":"hda-file","node-name":"hda-fmt"}'
    tail = [f"{TS}-blockdev {blockdev}: Unsupported qcow2 version 7"]
    assert explain(tail, pl) == "-hda /home/a/d.qcow2: Unsupported qcow2 version 7"


def test_loadvm_refusals() -> None:
    pl = plan("-hda", "/home/a/d.qcow2", "-loadvm", "before")
    assert explain([TS + "This is a disk-only snapshot. Revert to it  offline using qemu-img"], pl) == (
        "-loadvm before: a disk-only snapshot, which holds no VM state to start from"
    )
    assert explain([TS + "Snapshot 'before' does not exist in one or more devices"], pl) == (
        "-loadvm before: no snapshot of that name in the VM's disks"
    )


def test_an_unknown_message_keeps_its_words_without_fdsets() -> None:
    pl = plan("-kernel", "/home/a/vmlinuz")
    fd = fd_of(pl, "kernel", "blob")
    out = explain([TS + f"could not load kernel '/proc/self/fd/{fd}': broken", TS + "oops /dev/fdset/999"], pl)
    assert "/dev/fdset" not in out and "a file kvmgate opened" in out
    assert explain([], pl) == "QEMU exited without saying why"


def test_a_copied_rom_or_kernel_is_named_as_the_user_named_it() -> None:
    """A ROM QEMU could not load was named `/proc/self/fd/25`, the copy's fd."""
    pl = plan("-option-rom", "/home/a/ipxe.rom", "-kernel", "/home/a/vmlinuz")
    rom, kernel = fd_of(pl, "option-rom", "blob"), fd_of(pl, "kernel", "blob")
    out = explain([TS + f'failed to find romfile "/proc/self/fd/{rom}"'], pl)
    assert out == 'failed to find romfile "/home/a/ipxe.rom"', out
    out = explain([TS + f"could not load kernel '/proc/self/fd/{kernel}'"], pl)
    assert out == "could not load kernel '/home/a/vmlinuz'", out
