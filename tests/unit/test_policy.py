"""The policy: default lists, the admin's TOML overrides, and option parsing."""

from __future__ import annotations

import tomllib

import pytest

from kvmgate.errors import PolicyError
from kvmgate.model.policy.policy import Policy
from kvmgate.model.policy.table import OPTIONS

NOTE_USER = (
    "-fda -fdb -hda -hdb -cdrom -boot -snapshot -localtime -kernel -append -initrd -hdachs -no-acpi "
    "-no-reboot -loadvm -vnc -option-rom"
)
NOTE_ADMIN = (
    "-m -nographic -win2k-hack -usb -usbdevice -net -tftp -smb -redir -monitor -vmchannel -balloon "
    "-serial -parallel -pidfile -no-rtc"
)
NOTE_UNUSED = (
    "-M -hdc -hdd -no-quit -no-fd-bootchk -smp -k -audio-help -soundhw -full-screen -S -s -p -d -L "
    "-no-kvm -std-vga -daemonize"
)


def test_default_lists_are_the_notes() -> None:
    p = Policy()
    for lname, names in (("user", NOTE_USER), ("admin", NOTE_ADMIN), ("unused", NOTE_UNUSED)):
        assert {n for n in OPTIONS if p.list_of(n) == lname} == set(names.split())


def test_user_may_set_user_options() -> None:
    opts = Policy().parse(["-boot", "d", "-snapshot", "-cdrom", "/x.iso"], "user")
    assert [o.name for o in opts] == ["-boot", "-snapshot", "-cdrom"]


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["-m", "512"], "-m: only the administrator may set this option"),
        (["--m", "512"], "--m: unknown option (did you mean -m?)"),
        (["-m=512"], "-m: unknown option"),
        (["-sn"], "-sn: unknown option"),
        (["-snap"], "-snap: unknown option"),
        (["-boot", "c", "--", "-m", "1"], "--: not allowed among VM options"),
        (["-smp", "2"], "-smp: not used on this host"),
        (["-snapshot", "-snapshot"], "-snapshot: given more than once"),
        (["-boot"], "-boot: needs a value"),
        (["-append", "-m 1"], "-append: value must not start with '-'"),
        (["-hda", "-m"], "-hda: value must not start with '-'"),
        (["/etc/shadow"], "expected an option"),
        (["-net", "user"], "-net: only the administrator may set this option"),
        (["-incoming", "tcp:0:4444"], "-incoming: unknown option"),
        (["--incoming", "x"], "--incoming: unknown option"),
        (["-S"], "-S: not used on this host"),
        (["-append", "x" * 2049], "-append: longer than 2048 characters"),
        (["-option-rom", "/r"] * 33, "-option-rom: given more than 32 times (limits.repeat_max)"),
    ],
)
def test_user_refusals(tokens: list[str], message: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy().parse(tokens, "user")
    assert message in str(err.value)


def test_admin_may_set_admin_and_user_options_not_unused() -> None:
    p = Policy()
    assert len(p.parse(["-m", "256", "-net", "nic", "-net", "user", "-boot", "c"], "admin")) == 4
    with pytest.raises(PolicyError, match="-smp: not used"):
        p.parse(["-smp", "2"], "admin")


def policy(text: str) -> Policy:
    return Policy.from_dict(tomllib.loads(text))


def test_policy_file_moves_smp_to_users_with_limit() -> None:
    p = policy('[lists]\nuser = ["-smp"]\n[limits]\nsmp_max = 4\n')
    assert p.parse(["-smp", "4"], "user")[0].value.canonical == "4"
    with pytest.raises(PolicyError, match="between 1 and 4"):
        p.parse(["-smp", "8"], "user")


def test_policy_file_can_take_options_away() -> None:
    p = policy('[lists]\nunused = ["-vnc"]\n')
    with pytest.raises(PolicyError, match="-vnc: not used"):
        p.parse(["-vnc", ":1"], "user")


@pytest.mark.parametrize(
    "text, message",
    [
        ('colour = "red"\n', "unknown key 'colour'"),
        ('accel = "xen"\n', "accel must be"),
        ('qemu = "qemu-system-x86_64"\n', "absolute path"),
        ('[lists]\nuser = ["-monitor"]\n', "-monitor cannot be given to users"),
        ('[lists]\nuser = ["-net"]\n', "-net cannot be given to users"),
        ('[lists]\nadmin = ["-daemonize"]\n', "-daemonize cannot be enabled"),
        ('[lists]\nadmin = ["-s"]\n', "-s cannot be enabled: a gdb stub hands its holder QEMU's monitor"),
        ('[lists]\nuser = ["-p"]\n', "-p cannot be enabled: a gdb stub hands its holder QEMU's monitor"),
        ('[lists]\nuser = ["-smp"]\nadmin = ["-smp"]\n', "more than one list"),
        ('[lists]\nuser = ["-bogus"]\n', "unknown option '-bogus'"),
        ('[lists]\nfriends = ["-m"]\n', "unknown list"),
        ("[limits]\nmem_min_mib = 100\nmem_max_mib = 50\n", "above"),
        ("[limits]\nvnc = [5, 1]\n", "limits.vnc"),
        ('[limits]\nmachines = ["isapc"]\n', "limits.machines"),
        ("[limits]\ncolour = 1\n", "unknown key limits.colour"),
        ("stop_timeout = true\n", "stop_timeout"),
    ],
)
def test_bad_policy_files(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy(text)
    assert message in str(err.value)
