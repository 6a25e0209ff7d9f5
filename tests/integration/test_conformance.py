"""Conformance: every option of the note's "users may set" and "users may not set"
lists goes through kvmgate's translation into the real QEMU 7.2, which must accept
it. Each VM is started with --paused (QEMU's -S) and must answer QMP as paused."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ..conftest import BOOT_LINE, RUN, Kvmgate, boot_options, discard
from .test_networks import Net, net  # noqa: F401 - the namespace fixture


@pytest.fixture(scope="module")
def files(alice: str, guest: Path) -> dict[str, str]:
    """Images of every kind in alice's home, owned by alice."""
    home = Path(pwd.getpwnam(alice).pw_dir) / "conf"
    home.mkdir(exist_ok=True)
    shutil.copy(guest / "disk.raw", home / "disk.img")
    shutil.copy(guest / "disk.qcow2", home / "disk.qcow2")
    shutil.copy(guest / "cd.iso", home / "cd.iso")
    (home / "floppy.img").write_bytes(bytes(1474560))
    rom = bytearray(2048)
    rom[0:3] = b"\x55\xaa\x04"
    rom[-1] = (-sum(rom)) & 0xFF
    (home / "x.rom").write_bytes(bytes(rom))
    pw = pwd.getpwnam(alice)
    for p in [home, *home.iterdir()]:
        os.chown(p, pw.pw_uid, pw.pw_gid)
    tftp = Path("/srv/kvmgate-test-tftp")
    tftp.mkdir(parents=True, exist_ok=True)
    return {p.name: str(p) for p in home.iterdir()} | {"tftp": str(tftp)}


def start_paused(kg: Kvmgate, owner: str, name: str, admin: list[str], user: list[str], cleanup: list) -> dict:
    kg.ok("admin", "create", name, "--owner", owner, "--", *admin)
    cleanup.append((owner, name))
    kg.ok("start", name, "--owner", owner, "--paused", "--", *user)
    st = kg.json("status", name, "--owner", owner)
    assert st["state"] == "paused" and st["qemu_status"] == "prelaunch", st
    return st


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BASE = ["-m", "128", "-nographic"]


def user_cases(f: dict[str, str], guest: Path) -> dict[str, list[str]]:
    return {
        "-fda": ["-fda", f["floppy.img"]],
        "-fdb": ["-fdb", f["floppy.img"]],
        "-hda": ["-hda", f["disk.qcow2"]],
        "-hdb": ["-hdb", f["disk.img"]],
        "-cdrom": ["-cdrom", f["cd.iso"]],
        "-boot": ["-boot", "dc"],
        "-snapshot": ["-hda", f["disk.img"], "-snapshot"],
        "-localtime": ["-localtime"],
        "-kernel": ["-kernel", f"{guest}/vmlinuz"],
        "-append": ["-kernel", f"{guest}/vmlinuz", "-append", "console=ttyS0 a,b=c"],
        "-initrd": ["-kernel", f"{guest}/vmlinuz", "-initrd", f"{guest}/initrd.img"],
        "-hdachs": ["-hda", f["disk.img"], "-hdachs", "32,16,63,lba"],
        "-no-acpi": ["-no-acpi"],
        "-no-reboot": ["-no-reboot"],
        "-vnc": ["-vnc", ":47"],
        "-option-rom": ["-option-rom", f["x.rom"]],
    }


def admin_cases(f: dict[str, str]) -> dict[str, list[str]]:
    return {
        "-m": ["-m", "192"],
        "-nographic": ["-nographic"],
        "-win2k-hack": ["-win2k-hack"],
        "-usb": ["-usb"],
        "-usbdevice": ["-usbdevice", "tablet"],
        "-net": [
            "-net",
            "nic,model=e1000,macaddr=52:54:00:12:34:56",
            "-net",
            "user,hostname=conf",
            "-net",
            "nic,vlan=1",
            "-net",
            f"socket,vlan=1,listen=127.0.0.1:{free_port()}",
        ],
        "-tftp": ["-net", "nic", "-net", "user", "-tftp", f["tftp"]],
        "-smb": ["-net", "nic", "-net", "user", "-smb", f["tftp"]],
        "-redir": ["-net", "nic", "-net", "user", "-redir", "tcp:21990::22"],  # inside the test pool
        "-monitor": ["-monitor", "none"],
        "-vmchannel": ["-vmchannel", "di:org.kvmgate.test,null"],
        "-balloon": ["-balloon", "virtio"],
        "-serial": ["-serial", "null"],
        "-parallel": ["-parallel", "null"],
        "-pidfile": ["-pidfile", "/run/kvmgate-conformance.pid"],
        "-no-rtc": ["-no-rtc"],
    }


USER_OPTIONS = [
    "-fda",
    "-fdb",
    "-hda",
    "-hdb",
    "-cdrom",
    "-boot",
    "-snapshot",
    "-localtime",
    "-kernel",
    "-append",
    "-initrd",
    "-hdachs",
    "-no-acpi",
    "-no-reboot",
    "-vnc",
    "-option-rom",
]
ADMIN_OPTIONS = [
    "-m",
    "-nographic",
    "-win2k-hack",
    "-usb",
    "-usbdevice",
    "-net",
    "-tftp",
    "-smb",
    "-redir",
    "-monitor",
    "-vmchannel",
    "-balloon",
    "-serial",
    "-parallel",
    "-pidfile",
    "-no-rtc",
]


@pytest.mark.parametrize("option", USER_OPTIONS)
def test_user_option(
    option: str, kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, files: dict, guest: Path
) -> None:
    admin = ["-m", "128"] if option == "-vnc" else BASE  # a display needs a graphics card
    start_paused(kg, alice, vm_name, admin, user_cases(files, guest)[option], cleanup_vms)


@pytest.mark.parametrize("option", ADMIN_OPTIONS)
def test_admin_option(option: str, kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, files: dict) -> None:
    args = admin_cases(files)[option]
    st = start_paused(kg, alice, vm_name, (["-m", "128"] if option != "-m" else []) + args, [], cleanup_vms)
    if option == "-pidfile":
        assert Path("/run/kvmgate-conformance.pid").read_text().strip() == str(st["pid"])
        os.unlink("/run/kvmgate-conformance.pid")


def test_net_tap(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list) -> None:
    """-net tap: the helper opens the tap; QEMU gets only its fd."""
    start_paused(
        kg, alice, vm_name, ["-m", "128", "-net", "nic", "-net", "tap,ifname=kgconftap0,script=no"], [], cleanup_vms
    )
    assert subprocess.run(["ip", "link", "show", "kgconftap0"], capture_output=True).returncode == 0


def test_loadvm(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, files: dict, guest: Path) -> None:
    """-loadvm: save an internal snapshot over QMP (as root, on the root-only socket), then start from it."""
    disk = files["disk.qcow2"]
    st = start_paused(kg, alice, vm_name, BASE, ["-hda", disk], cleanup_vms)

    async def savevm() -> None:
        q = QMPClient("conformance")
        await q.connect(os.path.join(RUN, st["key"], "qmp.sock"))
        try:
            await q.execute("human-monitor-command", {"command-line": "savevm snap1"})
        finally:
            await q.disconnect()

    asyncio.run(savevm())
    kg.ok("stop", vm_name, "--owner", alice, "--force")
    kg.ok("start", vm_name, "--owner", alice, "--paused", "--", "-hda", disk, "-loadvm", "snap1")
    assert kg.json("status", vm_name, "--owner", alice)["state"] == "paused"


def test_owner_map_disks_start_hibernate_and_restore(net: Net, guest: Path, vm_name: str) -> None:  # noqa: F811
    """A service VM's owner map and answer disks (docs/services.md) on this QEMU: the guest
    finds both by their serials and reads the map's header, and the VM hibernates and restores."""
    svc = "kvmgate-svc"
    net.ok("admin", "create", vm_name, "--service", "--no-autostart", "--owner-map", "on", "--network", "services",
           "--", *boot_options(guest))  # fmt: skip
    try:
        net.ok("start", vm_name, "--owner", svc)
        net.ok("console", vm_name, "--owner", svc, "--expect", BOOT_LINE, "--timeout", "90")
        look = (
            "for d in /sys/block/vd*; do "
            "echo $(cat $d/serial) $(dd if=/dev/${d##*/} bs=64 count=1 2>/dev/null | head -c 18); done"
        )
        out = net.guest(svc, vm_name, look)
        assert "kvmgate-ownermap kvmgate-ownermap 1" in out and "kvmgate-ownerack" in out, out
        net.ok("hibernate", vm_name, "--owner", svc)
        net.ok("start", vm_name, "--owner", svc)
        assert "kvmgate-ownermap kvmgate-ownermap 1" in net.guest(svc, vm_name, look), "restored with both disks"
    finally:
        discard(net.kvmgate, svc, vm_name)


def test_every_note_option_is_covered(files: dict, guest: Path) -> None:
    from kvmgate.model.policy.table import OPTIONS

    assert {n for n, o in OPTIONS.items() if o.default == "user"} == set(USER_OPTIONS) | {"-loadvm"}
    assert {n for n, o in OPTIONS.items() if o.default == "admin"} == set(ADMIN_OPTIONS)
    assert set(user_cases(files, guest)) == set(USER_OPTIONS)
    assert set(admin_cases(files)) == set(ADMIN_OPTIONS)
