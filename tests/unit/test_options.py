"""One test per option of the policy table: accepted spellings with their canonical
form, and refused values. A test fails if any option in the table has no cases."""

from __future__ import annotations

import pytest

from kvmgate.errors import PolicyError
from kvmgate.model.policy.grammar import Limits
from kvmgate.model.policy.table import OPTIONS

LIM = Limits(mem_min_mib=16, mem_max_mib=4096, smp_max=4, vnc_min=1, vnc_max=20)

# option -> (accepted raw -> canonical, refused raws). Flags: ([None], ["x"]).
FLAG = ({None: ""}, ["x"])
CASES: dict[str, tuple[dict[str | None, str], list[str]]] = {
    "-fda": ({"/home/a/f.img": "/home/a/f.img"}, ["f.img", "fat:rw:/etc", "/a\nb"]),
    "-fdb": ({"/x//y/./z.img": "/x/y/z.img"}, ["json:{}", "nbd:localhost:10809"]),
    "-hda": ({"/home/a/a,file.driver=vvfat": "/home/a/a,file.driver=vvfat"}, ["http://x/y", "a.img", "/a\x00b"]),
    "-hdb": ({"/d.qcow2": "/d.qcow2"}, ["file:/etc/shadow", ""]),
    "-cdrom": ({"/home/a/x.iso": "/home/a/x.iso"}, ["x.iso", "fat:/etc"]),
    "-boot": ({"c": "c", "dcn": "dcn", "a": "a"}, ["", "cc", "x", "c,splash=/root/x", "order=c", "abcdn"]),
    "-snapshot": FLAG,
    "-localtime": FLAG,
    "-kernel": ({"/boot/vmlinuz": "/boot/vmlinuz"}, ["vmlinuz", 'json:{"a":1}']),
    "-append": ({"console=ttyS0 quiet a,b=c": "console=ttyS0 quiet a,b=c"}, ["a\nb", "x" * 3000, "caf\u00e9"]),
    "-initrd": ({"/boot/initrd.img": "/boot/initrd.img"}, ["initrd.img"]),
    "-hdachs": ({"100,16,63": "100,16,63", "1,1,1,lba": "1,1,1,lba"}, ["1,2", "0,1,1", "1,17,1", "1,1,1,xx", "a,b,c"]),
    "-no-acpi": FLAG,
    "-no-reboot": FLAG,
    "-loadvm": ({"snap1": "snap1", "a.b_c": "a.b_c"}, ["", "a b", "../x", "x,y", "x" * 65, "_x", ".x"]),
    "-vnc": ({":1": "1", "20": "20"}, [":0", ":21", "0.0.0.0:1", ":1,websocket=5700", "unix:/tmp/x", ":1\n"]),
    "-option-rom": ({"/roms/a.rom": "/roms/a.rom"}, ["a.rom"]),
    "-m": ({"256": "256", "1G": "1024", "16M": "16"}, ["8", "5000", "256k", "1.5G", "0x100", "256,slots=2"]),
    "-nographic": FLAG,
    "-win2k-hack": FLAG,
    "-usb": FLAG,
    "-usbdevice": ({"tablet": "tablet", "mouse": "mouse"}, ["host:1234:5678", "disk:/etc/shadow"]),
    "-net": (
        {
            "nic": "nic",
            "nic,model=virtio,macaddr=52:54:00:AA:bb:cc,vlan=1": "nic,vlan=1,macaddr=52:54:00:aa:bb:cc,model=virtio",
            "user,hostname=web": "user,hostname=web",
            "tap,ifname=kgtap0,script=no": "tap,ifname=kgtap0,script=no",
            "socket,listen=:1234": "socket,listen=:1234",
            "socket,mcast=230.0.0.1:1234": "socket,mcast=230.0.0.1:1234",
            "none": "none",
        },
        [
            "bridge",
            "nic,model=virtio,,x",
            "nic,id=x",
            "user,hostfwd=tcp::1-:22",
            "tap,ifname=x,script=/tmp/s",
            "tap,fd=3,ifname=x",
            "tap",
            "socket",
            "socket,listen=:1,connect=a:2",
            "nic,macaddr=01:00:00:00:00:01",
            "user,hostname=a_b",
            "nic,vlan=99",
            "none,x=1",
            "nic,model=virtio\n",
        ],
    ),
    "-tftp": ({"/srv/tftp": "/srv/tftp"}, ["srv"]),
    "-smb": ({"/srv/share": "/srv/share"}, ["share"]),
    "-redir": (
        {"tcp:2222::22": "tcp:2222::22", "udp:5353:10.0.2.15:53": "udp:5353:10.0.2.15:53", "80::8080": "tcp:80::8080"},
        ["tcp:2222:22", "sctp:1::2", "tcp:0::22", "tcp:1:host:2", "tcp:2222::22,x=y"],
    ),
    "-monitor": ({"none": "none"}, ["stdio", "vc", "tcp::4444,server", "unix:/tmp/m"]),
    "-vmchannel": ({"di:org.x,null": "di:org.x,null"}, ["di:x,tcp::1", "x", "di:X,null"]),
    "-balloon": ({"virtio": "virtio", "none": "none"}, ["virtio,deflate-on-oom=on"]),
    "-serial": ({"console": "console", "null": "null", "none": "none"}, ["stdio", "pty", "file:/etc/x", "tcp::1"]),
    "-parallel": ({"null": "null", "none": "none"}, ["/dev/parport0", "stdio"]),
    "-pidfile": ({"/run/x.pid": "/run/x.pid"}, ["x.pid"]),
    "-no-rtc": FLAG,
    "-M": ({"pc": "pc", "q35": "q35"}, ["isapc", "pc,accel=kvm", "none"]),
    "-hdc": ({"/c.img": "/c.img"}, ["c.img"]),
    "-hdd": ({"/d.img": "/d.img"}, ["d.img"]),
    "-no-quit": FLAG,
    "-no-fd-bootchk": FLAG,
    "-smp": ({"1": "1", "4": "4"}, ["0", "5", "2,sockets=1", "x"]),
    "-k": ({"fr": "fr", "en-us": "en-us"}, ["../../etc/passwd", "FR", "fr,x"]),
    "-audio-help": FLAG,
    "-soundhw": ({"ac97": "ac97", "hda,sb16": "hda,sb16"}, ["all", "pcspk", "ac97,ac97", ""]),
    "-full-screen": FLAG,
    "-S": FLAG,
    "-s": FLAG,
    "-p": ({"1234": "1234"}, ["0", "70000", "x"]),
    "-d": ({"guest_errors": "guest_errors", "int,unimp": "int,unimp"}, ["trace:*", "help"]),
    "-L": ({"/usr/share/qemu": "/usr/share/qemu"}, ["share"]),
    "-no-kvm": FLAG,
    "-std-vga": FLAG,
    "-daemonize": FLAG,
}


def test_every_option_has_cases() -> None:
    assert set(CASES) == set(OPTIONS), set(OPTIONS) ^ set(CASES)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option(option: str) -> None:
    spec = OPTIONS[option]
    accepted, refused = CASES[option]
    for raw, canonical in accepted.items():
        if spec.parse is None:
            assert raw is None
            continue
        assert raw is not None
        assert spec.parse(option, raw, LIM).canonical == canonical
        # canonical forms are fixed points: they are what identities store
        assert spec.parse(option, canonical, LIM).canonical == canonical
    for raw in refused:
        if spec.parse is None:
            continue
        with pytest.raises(PolicyError) as err:
            spec.parse(option, raw, LIM)
        assert str(err.value).startswith(option + ":"), "the refusal names the option"
