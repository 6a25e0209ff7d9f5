"""The VM registry on disk, through the real `kvmgate admin` commands."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from kvmgate.model import identity as ident

from ..conftest import STATE, Kvmgate, boot_options


def test_create_show_round_trip(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    opts = boot_options(guest, "-net", "nic,model=virtio", "-net", "user,hostname=web")
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "32M", "--", *opts)
    cleanup_vms.append((alice, vm_name))
    info = kg.json("admin", "show", vm_name, "--owner", alice)
    assert info["owner"] == alice and info["name"] == vm_name and info["state"] == "stopped"
    assert info["options"] == opts
    decoded = ident.decode(info["identity_components"])
    assert (decoded.owner, decoded.name, list(decoded.tokens)) == (alice, vm_name, opts)
    assert os.path.basename(info["directory"]) == info["identity_components"][0]
    assert vm_name not in " ".join(info["qemu_argv"]), "the name never reaches QEMU"
    assert info["default_disk"].endswith("/disks/disk0.qcow2")


def test_layout_ownership_and_modes(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "8M", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    d = Path(kg.json("admin", "show", vm_name, "--owner", alice)["directory"])
    uid = pwd.getpwnam(alice).pw_uid

    def owner_mode(p: Path) -> tuple[int, int]:
        st = p.lstat()
        return st.st_uid, stat.S_IMODE(st.st_mode)

    assert owner_mode(Path(STATE, "vms")) == (0, 0o711)
    assert owner_mode(Path(STATE, "names")) == (0, 0o700)
    assert owner_mode(d) == (0, 0o711)
    assert owner_mode(d / "disks") == (uid, 0o700)
    assert owner_mode(d / "disks/disk0.qcow2") == (uid, 0o600)
    assert owner_mode(d / "tmp") == (uid, 0o700)
    for root_only in ("saved", "log"):
        assert owner_mode(d / root_only) == (0, 0o700)
    link = Path(STATE, "names", alice, vm_name)
    assert link.is_symlink() and link.resolve() == d.resolve()


def test_forty_option_vm_is_chained_and_starts(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    opts = [
        "-m",
        "128",
        "-nographic",
        "-usb",
        "-usbdevice",
        "tablet",
        "-usbdevice",
        "mouse",
        "-usbdevice",
        "keyboard",
        "-kernel",
        f"{guest}/vmlinuz",
        "-initrd",
        f"{guest}/initrd.img",
        "-append",
        "console=ttyS0 " + " ".join(f"kvmgate.opt{i}=value{i}" for i in range(40)),
    ]
    for v in range(16):
        opts += ["-net", f"nic,vlan={v},macaddr=52:54:00:00:01:{v:02x},model=virtio", "-net", f"user,vlan={v}"]
    assert sum(1 for t in opts if t.startswith("-")) >= 40
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *opts)
    cleanup_vms.append((alice, vm_name))
    info = kg.json("admin", "show", vm_name, "--owner", alice)
    comps = info["identity_components"]
    assert len(comps) > 1 and all(len(c) <= 255 for c in comps)
    assert list(ident.decode(comps).tokens) == opts
    kg.ok("start", vm_name, "--owner", alice, "--paused")
    assert kg.json("status", vm_name, "--owner", alice)["state"] == "paused"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["Bad"], 2, "invalid VM name"),
        (["a" * 33], 2, "invalid VM name"),
        (["../x"], 2, "invalid VM name"),
        (["ok", "--", "-m", "99999"], 3, "-m: must be between"),
        (["ok", "--", "-bogus"], 3, "-bogus: unknown option"),
        (["ok", "--", "-smp", "2"], 3, "-smp: not used on this host"),
        (["ok", "--", "-net", "user,hostfwd=tcp::1-:22"], 3, "unknown sub-option 'hostfwd'"),
        (["ok", "--", "-net", "tap,ifname=x,script=/tmp/evil"], 3, "script must be 'no'"),
        (["ok", "--", "-monitor", "tcp::4444,server"], 3, "-monitor: only 'none'"),
        (["ok", "--", "-append", "a\nb"], 3, "-append: must be printable"),
        (["ok", "--", "-redir", "tcp:22::22", "-net", "none"], 3, "-redir: needs -net user"),
        (["ok", "--disk-size", "1Q"], 2, "--disk-size"),
    ],
)
def test_bad_create_changes_nothing(kg: Kvmgate, alice: str, args: list[str], code: int, message: str) -> None:
    before = kg.state_snapshot()
    r = kg("admin", "create", *args[:1], "--owner", alice, *args[1:])
    assert r.returncode == code, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert kg.state_snapshot() == before


def test_create_for_unknown_user_or_root_is_refused(kg: Kvmgate) -> None:
    before = kg.state_snapshot()
    assert kg("admin", "create", "x", "--owner", "nosuchuserkg").returncode == 2
    assert kg("admin", "create", "x", "--owner", "root").returncode == 2
    assert kg.state_snapshot() == before


def test_duplicate_name_is_wrong_state(kg: Kvmgate, alice: str, bob: str, vm_name: str, cleanup_vms: list) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", "-m", "64")
    cleanup_vms.append((alice, vm_name))
    assert kg("admin", "create", vm_name, "--owner", alice, "--", "-m", "128").returncode == 5
    # the same name for another owner is a different VM
    kg.ok("admin", "create", vm_name, "--owner", bob, "--", "-m", "64")
    cleanup_vms.append((bob, vm_name))
    a = kg.json("admin", "show", vm_name, "--owner", alice)
    b = kg.json("admin", "show", vm_name, "--owner", bob)
    assert a["directory"] != b["directory"] and a["key"] != b["key"]


def test_tampered_identity_is_refused(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    d = Path(kg.json("admin", "show", vm_name, "--owner", alice)["directory"])
    forged = ident.Identity(alice, vm_name, ("-m", "4096", "-nographic")).components()[0]
    link = Path(STATE, "names", alice, vm_name)
    d.rename(d.parent / forged)
    try:
        # a directory whose name is a valid identity of other options: the name link no longer resolves
        assert kg("start", vm_name, "--owner", alice).returncode == 4
        # a directory name that is not canonical base64 is refused, never decoded leniently
        (d.parent / forged).rename(d.parent / (forged + "A"))
        link.unlink()
        link.symlink_to(f"../../vms/{forged}A")
        r = kg("start", vm_name, "--owner", alice)
        assert r.returncode == 3 and "identity" in r.stderr
    finally:
        for cand in (d.parent / (forged + "A"), d.parent / forged):
            if cand.exists():
                cand.rename(d)
        link.unlink()
        link.symlink_to(f"../../vms/{d.name}")


def test_link_to_another_users_vm_is_refused(
    kg: Kvmgate, alice: str, bob: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    kg.ok("admin", "create", vm_name, "--owner", bob, "--", *boot_options(guest))
    cleanup_vms.append((bob, vm_name))
    bob_dir = Path(kg.json("admin", "show", vm_name, "--owner", bob)["directory"]).name
    own = Path(STATE, "names", alice)
    own.mkdir(mode=0o700, exist_ok=True)
    (own / vm_name).symlink_to(f"../../vms/{bob_dir}")
    try:
        r = kg("start", vm_name, "--owner", alice)
        assert r.returncode == 3 and "another VM's identity" in r.stderr
        assert kg.json("status", vm_name, "--owner", bob)["state"] == "stopped"
    finally:
        (own / vm_name).unlink()


def test_delete_keep_disks(kg: Kvmgate, alice: str, vm_name: str) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "4M", "--", "-m", "64")
    d = Path(kg.json("admin", "show", vm_name, "--owner", alice)["directory"])
    out = kg.ok("admin", "delete", vm_name, "--owner", alice, "--keep-disks").stdout
    kept = Path(out.rsplit("disks kept in ", 1)[1].strip())
    assert (kept / "disk0.qcow2").exists() and not d.exists()
    assert kg("admin", "show", vm_name, "--owner", alice).returncode == 4
