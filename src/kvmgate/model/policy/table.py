"""The option table: every option of the design note, its default list, and its grammar.

`USER`, `ADMIN` and `UNUSED` are the note's three lists. An admin's policy file
may move options between lists, within two fixed limits:
- `user_ok=False`: the option hands out a host resource (networking, the monitor,
  character devices, files written on the host), so it can never be the user's.
- `fixed=True`: refused for everyone, whatever the policy says: kvmgate itself owns
  what it controls (-S, -daemonize, -audio-help), or the option would hand its holder
  QEMU's monitor (-s, -p: QEMU's gdb stub passes `monitor` commands to the human
  monitor, with which one can add NICs, open host ports and change what the
  administrator fixed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from kvmgate.model.policy import grammar as g

ListName = Literal["user", "admin", "unused"]
LISTS: tuple[ListName, ...] = ("user", "admin", "unused")

Parser = Callable[[str, str, g.Limits], g.Value]


class OptionSpec(NamedTuple):
    name: str
    parse: Parser | None  # None: a flag that takes no value
    default: ListName
    summary: str
    repeatable: bool = False
    user_ok: bool = True
    fixed: bool = False


def _o(name: str, parse: Parser | None, default: ListName, summary: str, **kw: bool) -> OptionSpec:
    return OptionSpec(name, parse, default, summary, **kw)


HOST = {"user_ok": False}

OPTIONS: dict[str, OptionSpec] = {
    o.name: o
    for o in (
        # ---- Options that users are allowed to set
        _o("-fda", g.parse_path, "user", "floppy disk 0 image"),
        _o("-fdb", g.parse_path, "user", "floppy disk 1 image"),
        _o("-hda", g.parse_path, "user", "IDE hard disk 0 image"),
        _o("-hdb", g.parse_path, "user", "IDE hard disk 1 image"),
        _o("-cdrom", g.parse_path, "user", "IDE CD-ROM image (ide1 master)"),
        _o("-boot", g.parse_boot, "user", "boot order from a (floppy), c (disk), d (CD-ROM), n (network)"),
        _o("-snapshot", None, "user", "write to temporary overlays, never to the images"),
        _o("-localtime", None, "user", "real-time clock in local time"),
        _o("-kernel", g.parse_path, "user", "Linux kernel image"),
        _o("-append", g.parse_cmdline, "user", "kernel command line"),
        _o("-initrd", g.parse_path, "user", "initial ramdisk"),
        _o("-hdachs", g.parse_geometry, "user", "hard disk 0 geometry c,h,s[,t]"),
        _o("-no-acpi", None, "user", "disable ACPI"),
        _o("-no-reboot", None, "user", "exit instead of rebooting"),
        _o("-loadvm", g.parse_tag, "user", "start from an internal snapshot tag"),
        _o("-vnc", g.parse_vnc, "user", "VNC display number"),
        _o("-option-rom", g.parse_path, "user", "option ROM image", repeatable=True),
        # ---- Options that users are not allowed to set
        _o("-m", g.parse_mem, "admin", "RAM size in MiB"),
        _o("-nographic", None, "admin", "no graphics card; the serial console is the console"),
        _o("-win2k-hack", None, "admin", "Windows 2000 install workaround"),
        _o("-usb", None, "admin", "enable USB"),
        _o(
            "-usbdevice", g.parse_word(("tablet", "mouse", "keyboard")), "admin", "emulated USB device", repeatable=True
        ),
        _o("-net", g.parse_net, "admin", "network: nic, user, tap, socket, none", repeatable=True, **HOST),
        _o("-tftp", g.parse_path, "admin", "TFTP root for user networking", **HOST),
        _o("-smb", g.parse_path, "admin", "SMB share for user networking", **HOST),
        _o("-redir", g.parse_redir, "admin", "forward a host port to the guest", repeatable=True, **HOST),
        _o("-monitor", g.parse_monitor, "admin", "monitor device (only none)", **HOST),
        _o("-vmchannel", g.parse_vmchannel, "admin", "named virtio-serial channel", repeatable=True, **HOST),
        _o("-balloon", g.parse_word(("none", "virtio")), "admin", "memory balloon device"),
        _o("-serial", g.parse_word(("console", "null", "none")), "admin", "serial port 0 backend", **HOST),
        _o("-parallel", g.parse_word(("null", "none")), "admin", "parallel port backend", **HOST),
        _o("-pidfile", g.parse_path, "admin", "extra pid file written by kvmgate", **HOST),
        _o("-no-rtc", None, "admin", "obsolete host timer switch (no effect today)"),
        # ---- Options that are not used
        _o("-M", g.parse_machine, "unused", "machine type"),
        _o("-hdc", g.parse_path, "unused", "IDE hard disk 2 image"),
        _o("-hdd", g.parse_path, "unused", "IDE hard disk 3 image"),
        _o("-no-quit", None, "unused", "SDL close switch (no effect: no local display)"),
        _o("-no-fd-bootchk", None, "unused", "no floppy boot signature check"),
        _o("-smp", g.parse_smp, "unused", "number of CPUs"),
        _o("-k", g.parse_keymap, "unused", "VNC keyboard layout"),
        _o("-audio-help", None, "unused", "print audio help", fixed=True),
        _o("-soundhw", g.parse_soundhw, "unused", "sound cards"),
        _o("-full-screen", None, "unused", "full screen (no effect: no local display)"),
        _o("-S", None, "unused", "freeze CPU at startup", fixed=True),
        _o("-s", None, "unused", "gdb stub (never: its `monitor` command is QEMU's monitor)", fixed=True),
        _o("-p", g.parse_port, "unused", "gdb stub on a port (never, as -s)", fixed=True),
        _o("-d", g.parse_log_items, "unused", "QEMU debug log items", **HOST),
        _o("-L", g.parse_path, "unused", "firmware directory", **HOST),
        _o("-no-kvm", None, "unused", "use the TCG accelerator"),
        _o("-std-vga", None, "unused", "standard VGA card"),
        _o("-daemonize", None, "unused", "daemonize (kvmgate supervises QEMU itself)", fixed=True),
    )
}
