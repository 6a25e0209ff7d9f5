"""Networks the admin names, forwarded ports and VNC, end to end: real guests on
real bridges, built by kvmgate inside a network namespace this module makes (so
bridges, nftables tables, dnsmasq and every port live and die with it).

Isolation is asserted twice: from inside the guests (ping, TCP, ARP, broadcast
fail) and from the host, by capturing every frame that reaches the victim's tap.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..conftest import (
    BOOT_LINE,
    DEFAULT_POLICY,
    ETC,
    KVMGATE,
    RUN,
    SSH_THROWAWAY,
    Kvmgate,
    Pause,
    as_user,
    boot_options,
    discard,
    parent_of,
    run,
)

SNIFF = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
print("ready", flush=True)
seen, end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        f = s.recv(2048)
    except TimeoutError:
        continue
    ip_src = ".".join(str(b) for b in f[26:30]) if f[12:14] == b"\x08\x00" else None
    dhcp = f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x00\x43"  # to a DHCP server: its chaddr
    seen.append({"src": f[6:12].hex(":"), "type": f[12:14].hex(), "ip_src": ip_src,
                 "chaddr": f[70:76].hex(":") if dhcp else None})
print(json.dumps(seen), flush=True)
"""


class Net:
    """kvmgate, sniffers and probes, run inside the namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.seq = itertools.count(secrets.randbelow(10**6) * 100)

    def cmd(self, argv: list[str], user: str | None = None) -> list[str]:
        if user is None:
            return ["ip", "netns", "exec", self.ns, *argv]
        return ["ip", "netns", "exec", self.ns, "/usr/sbin/runuser", "-u", user, "--", *argv]

    def kvmgate(self, *args: str, user: str | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
        env = None
        if user is not None:
            pw = pwd.getpwnam(user)
            env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "LANG": "C.UTF-8"}
        return run(self.cmd([KVMGATE, *args], user), env=env, cwd="/", **kw)  # type: ignore[arg-type]

    def ok(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        r = self.kvmgate(*args, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"kvmgate {' '.join(args)} -> {r.returncode}: {r.stderr}{r.stdout}"
        return r

    def json(self, *args: str, **kw: object) -> object:
        return json.loads(self.ok(*args, "--json", **kw).stdout)  # type: ignore[arg-type]

    def sh(self, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(list(argv), user), cwd="/")

    def links(self) -> list[str]:
        return sorted(line.split()[0].split("@")[0] for line in self.sh("ip", "-br", "link").stdout.splitlines())

    def guest(self, owner: str, name: str, script: str, timeout: int = 60) -> str:
        """Run `script` in the guest's shell; returns what it printed."""
        n = next(self.seq)
        line = f"echo KGB-$(({n}+1)); {script}; echo KGE-$(({n}+2))"
        r = self.kvmgate(
            "console", name, "--owner", owner, "--expect", f"KGE-{n + 2}", "--timeout", str(timeout), input=line + "\n"
        )
        assert r.returncode == 0, r.stderr + r.stdout[-2000:]
        return r.stdout[r.stdout.rfind(f"KGB-{n + 1}") :]

    def sniff(self, ifname: str, seconds: float) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            self.cmd([sys.executable, "-c", SNIFF, ifname, str(seconds)]), stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    @staticmethod
    def frames(p: subprocess.Popen[str]) -> list[dict[str, str]]:
        out, _ = p.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def net(kg: Kvmgate) -> Iterator[Net]:
    ns = f"kgtn{secrets.token_hex(3)}"
    run(["ip", "netns", "add", ns], check=True)
    run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    n = Net(ns)
    yield n
    n.kvmgate("admin", "net-down")
    for pid in run(["ip", "netns", "pids", ns]).stdout.split():
        run(["kill", "-9", pid])
    run(["ip", "netns", "del", ns])


@pytest.fixture
def vms(net: Net) -> Iterator[list[tuple[str, str]]]:
    made: list[tuple[str, str]] = []
    yield made
    for owner, name in made:
        discard(net.kvmgate, owner, name)


def name() -> str:
    return f"n{secrets.token_hex(4)}"


def boot(guest: Path, *flags: str) -> list[str]:
    opts = boot_options(guest)
    opts[opts.index("-append") + 1] += "".join(f" {f}" for f in flags)
    return opts


def create(net: Net, vms: list, owner: str | None, vm: str, *args: str, service: bool = False) -> dict:
    who = ["--service", "--no-autostart"] if service else ["--owner", owner or ""]
    net.ok("admin", "create", vm, *who, *args)
    real_owner = "kvmgate-svc" if service else owner
    vms.append((real_owner, vm))
    return net.json("admin", "show", vm, "--owner", real_owner)  # type: ignore[return-value]


def up_with_address(net: Net, owner: str, vm: str, ip: str, user: str | None) -> None:
    net.ok("start", vm, *(["--owner", owner] if user is None else []), user=user)
    net.ok(
        "console", vm, "--owner", owner, "--expect", rf"KVMGATE-GUEST-NET eth0 {re.escape(ip)}\b", "--timeout", "120"
    )


# ------------------------------------------------------------------------- services


def test_services_network_reach_isolation_and_spoofing(net: Net, vms: list, alice: str, bob: str, guest: Path) -> None:
    svc = create(net, vms, None, name(), "--network", "services", "--", *boot(guest, "kvmgate.httpd"), service=True)
    a = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest, "kvmgate.httpd"))
    b = create(net, vms, bob, name(), "--network", "services", "--", *boot(guest, "kvmgate.httpd"))
    (sip, aip, bip) = (x["nics"][0]["ip"] for x in (svc, a, b))
    amac = a["nics"][0]["mac"]
    up_with_address(net, "kvmgate-svc", svc["name"], sip, None)
    up_with_address(net, alice, a["name"], aip, alice)
    up_with_address(net, bob, b["name"], bip, bob)

    # What users are told: their own VM's address, and the service VMs' addresses.
    assert net.json("status", a["name"], user=alice)["networks"] == [  # type: ignore[index]
        {"network": "services", "mac": amac, "ip": aip}
    ]
    services = net.json("list", "--services", user=bob)
    assert {"network": "services", "mac": svc["nics"][0]["mac"], "ip": sip} in next(
        r["addresses"]
        for r in services
        if r["name"] == svc["name"]  # type: ignore[union-attr]
    )

    # The bridge as kvmgate built it: user VMs isolated, the service VM not.
    ports = net.sh("bridge", "-d", "link", "show").stdout
    for nic, isolated in ((svc, "off"), (a, "on"), (b, "on")):
        tap = nic["nics"][0]["tap"]
        assert re.search(rf"{tap}:.*master ktsvc0.*\n.*isolated {isolated}", ports), ports

    # Every user VM reaches the service VM over TCP, and the service VM reaches them.
    get = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {sip} 80"
    for owner, vm in ((alice, a["name"]), (bob, b["name"])):
        assert "kvmgate-guest-httpd" in net.guest(owner, vm, get)
    assert "1 packets received" in net.guest("kvmgate-svc", svc["name"], f"ping -c 1 -W 5 {aip}")

    # Alice's VM tries everything against Bob's; a capture on Bob's tap sees none of it.
    sniffer = net.sniff(b["nics"][0]["tap"], 25)
    out = net.guest(
        alice,
        a["name"],
        f"ping -c 2 -W 2 {bip}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {bip} 80; "
        f"arping -c 2 -w 3 -I eth0 {bip}; ping -b -c 2 -W 2 10.78.0.255; "
        f"echo hello | nc -u -w 1 10.78.0.255 5000",
    )
    frames = net.frames(sniffer)
    assert "0 packets received" in out and "kvmgate-guest-httpd" not in out and "Received 0 response" in out
    assert not [f for f in frames if f["src"] == amac], frames

    # Spoofing: another MAC, then another address. A capture on the service VM's tap
    # shows that neither leaves the bridge's port; the genuine identity still works.
    sniffer = net.sniff(svc["nics"][0]["tap"], 30)
    out = net.guest(
        alice,
        a["name"],
        "ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66; ip link set eth0 up; "
        f"ping -c 2 -W 2 {sip}; ip link set eth0 down; ip link set eth0 address {amac}; ip link set eth0 up; "
        f"ip addr add 10.78.0.200/24 dev eth0; ping -c 2 -W 2 -I 10.78.0.200 {sip}; "
        f"ip addr del 10.78.0.200/24 dev eth0; ping -c 2 -W 3 {sip}",
        timeout=90,
    )
    frames = net.frames(sniffer)
    results = re.findall(r"(\d) packets received", out)
    assert results[:2] == ["0", "0"] and int(results[2]) >= 1, out  # the first ping may go to ARP
    assert not [f for f in frames if f["src"] == "52:54:00:66:66:66" or f["ip_src"] == "10.78.0.200"], frames


def test_private_network_joins_only_the_owners_vms(net: Net, vms: list, alice: str, bob: str, guest: Path) -> None:
    mine = [create(net, vms, alice, name(), "--network", "private", "--", *boot(guest)) for _ in range(2)]
    theirs = create(net, vms, bob, name(), "--network", "private", "--", *boot(guest))
    for i, (owner, x) in enumerate([(alice, mine[0]), (alice, mine[1]), (bob, theirs)]):
        net.ok("start", x["name"], user=owner)
        net.ok("console", x["name"], "--owner", owner, "--expect", BOOT_LINE, "--timeout", "120")
        net.guest(owner, x["name"], f"ip addr add 192.168.77.{i + 1}/24 dev eth0; ip link set eth0 up")
    bridges = {u: f"ktp{pwd.getpwnam(u).pw_uid:x}" for u in (alice, bob)}
    assert set(bridges.values()) <= set(net.links())
    assert "1 packets received" in net.guest(alice, mine[0]["name"], "ping -c 1 -W 5 192.168.77.2")
    assert "0 packets received" in net.guest(alice, mine[0]["name"], "ping -c 2 -W 2 192.168.77.3")


# --------------------------------------------------------------------------- ports


def _connect(net: Net, port: int, user: str | None) -> str:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(10)\n"
        "try:\n s.connect(('127.0.0.1', int(sys.argv[1]))); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        " data=b''\n"
        " while chunk := s.recv(4096): data += chunk\n"
        " print('connected', data.decode(errors='replace'))\n"
        "except OSError as e: print('refused', type(e).__name__)\n"
    )
    return net.sh(sys.executable, "-c", probe, str(port), user=user).stdout


def test_forwarded_ports_reach_the_guest_for_its_owner_only(
    net: Net, vms: list, alice: str, bob: str, guest: Path
) -> None:
    vm = create(net, vms, alice, name(), "--forward", "ssh,http", "--", *boot(guest, "kvmgate.httpd", "kvmgate.ssh"))
    net.ok("start", vm["name"], user=alice)
    net.ok("console", vm["name"], "--owner", alice, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "120")
    rows = net.json("ports", vm["name"], user=alice)
    assert [(r["service"], r["guest_port"], r["host"], r["via"]) for r in rows] == [
        ("ssh", 22, "127.0.0.1", "qemu"),
        ("http", 80, "127.0.0.1", "qemu"),
    ]
    http = next(r["port"] for r in rows if r["service"] == "http")
    assert all(21000 <= r["port"] <= 21999 for r in rows)

    deadline, out = time.monotonic() + 60, ""
    while "kvmgate-guest-httpd" not in out and time.monotonic() < deadline:
        out = _connect(net, http, alice)
    assert "kvmgate-guest-httpd" in out  # the owner reaches the guest
    assert _connect(net, http, bob).startswith("refused")  # another local user does not (nftables, skuid)
    assert "kvmgate-guest-httpd" in _connect(net, http, None)  # root does

    # kvmgate ssh: ssh(1) as alice, to the forwarded port, reaches the guest's port 22.
    r = net.kvmgate(
        "ssh",
        vm["name"],
        "--",
        "-v",
        *SSH_THROWAWAY,
        "true",
        user=alice,
        timeout=60,
    )
    assert "remote software version kvmgate-test-guest" in r.stderr, r.stderr

    # Bob can neither see Alice's ports nor ssh into her VM.
    assert net.kvmgate("ports", vm["name"], user=bob).returncode == 4
    r = net.kvmgate("ssh", vm["name"], user=bob)
    assert r.returncode == 4 and "no such VM" in r.stderr

    listeners = net.sh("ss", "-Hltn").stdout
    for row in rows:
        assert f"127.0.0.1:{row['port']} " in listeners
    assert not re.search(r"(0\.0\.0\.0|\*|\[::\]):(21\d\d\d|59\d\d)\b", listeners), listeners


# ----------------------------------------------------------------------------- vnc


def _rfb(net: Net, target: str, user: str | None, keys: bool = False) -> str:
    """An RFB client: the server's version and security types; with `keys`, it also
    authenticates (None) and presses Ctrl+Alt+2, QEMU's monitor console hot key."""
    probe = (
        "import socket,struct,sys,time\n"
        "t=sys.argv[1]\n"
        "try:\n"
        " s=socket.socket(socket.AF_UNIX) if t.startswith('/') else socket.socket()\n"
        " s.settimeout(5); s.connect(t if t.startswith('/') else ('127.0.0.1', int(t)))\n"
        "except OSError as e:\n print('refused', type(e).__name__); sys.exit()\n"
        "v=s.recv(12); s.sendall(v); n=s.recv(1)[0]; types=list(s.recv(n)); print('types', types)\n"
        "if sys.argv[2]=='keys' and 1 in types:\n"
        " s.sendall(bytes([1])); assert s.recv(4)==b'\\0\\0\\0\\0'; s.sendall(b'\\1'); s.recv(24)\n"
        " for k in (0xffe3,0xffe9,0x32):\n  s.sendall(struct.pack('>BBxxI',4,1,k))\n"
        " for k in (0x32,0xffe9,0xffe3):\n  s.sendall(struct.pack('>BBxxI',4,0,k))\n"
        " time.sleep(1); print('keys sent')\n"
    )
    return net.sh(sys.executable, "-c", probe, target, "keys" if keys else "-", user=user).stdout


def _qmp(vm_key: str, *commands: dict) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(f"{RUN}/{vm_key}/qmp.sock")
    f = s.makefile("rw")
    f.readline()
    out = []
    for c in [{"execute": "qmp_capabilities"}, *commands]:
        f.write(json.dumps(c) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                out.append(msg)
                break
    s.close()
    return out[1:]


def test_vnc_unix_socket_is_the_owners_and_has_no_monitor(
    net: Net, vms: list, alice: str, bob: str, guest: Path
) -> None:
    vm = create(net, vms, alice, name(), "--network", "user", "--", "-m", "128")
    net.ok("start", vm["name"], "--paused", "--", "-vnc", "5", user=alice)
    info = net.json("vnc", vm["name"], user=alice)
    assert info["kind"] == "unix" and info["socket"].startswith(f"{RUN}-display/")
    assert info["tunnel"].startswith("ssh -N -L 5900:" + info["socket"])
    assert _rfb(net, info["socket"], alice).strip() == "types [1]"  # the owner: a display, no password needed
    assert _rfb(net, info["socket"], bob).startswith("refused PermissionError")  # anyone else: not even a connect
    assert net.kvmgate("vnc", vm["name"], user=bob).returncode == 4
    listeners = net.sh("ss", "-Hltn").stdout
    assert ":59" not in listeners, listeners  # no TCP listener at all

    # No monitor behind the display: QEMU has no character device but kvmgate's own two,
    # and Ctrl+Alt+2 leaves the screen exactly as it was.
    chardevs = _qmp(vm["key"], {"execute": "query-chardev"})[0]["return"]
    assert sorted(c["label"] for c in chardevs) == ["kgcon", "kgqmp"]
    home = Path(pwd.getpwnam(alice).pw_dir)
    shots = [home / "before.ppm", home / "after.ppm"]
    _qmp(vm["key"], {"execute": "screendump", "arguments": {"filename": str(shots[0])}})
    assert "keys sent" in _rfb(net, info["socket"], alice, keys=True)
    _qmp(vm["key"], {"execute": "screendump", "arguments": {"filename": str(shots[1])}})
    assert shots[0].read_bytes() == shots[1].read_bytes()


def test_a_graphics_card_always_gets_its_owners_socket(net: Net, vms: list, alice: str) -> None:
    """A VGA VM started without -vnc had a screen nobody could ever see; -vnc on a
    -nographic VM showed nothing."""
    vm = create(net, vms, alice, name(), "--network", "user", "--", "-m", "128")
    net.ok("start", vm["name"], "--paused", user=alice)
    info = net.json("vnc", vm["name"], user=alice)
    assert info["kind"] == "unix"
    assert _rfb(net, info["socket"], alice).strip() == "types [1]"
    headless = create(net, vms, alice, name(), "--network", "user", "--", "-m", "128", "-nographic")
    r = net.kvmgate("start", headless["name"], "--", "-vnc", "1", user=alice)
    assert r.returncode == 3 and "no graphics card" in r.stderr, r.stderr
    assert net.kvmgate("vnc", headless["name"], user=alice).returncode == 5, "not running: no display"


def test_vnc_tcp_is_loopback_with_a_fresh_password(net: Net, vms: list, alice: str, bob: str, guest: Path) -> None:
    Path(ETC, "policy.toml").write_text(DEFAULT_POLICY + '[vnc]\nmode = "tcp"\n')
    vm = create(net, vms, alice, name(), "--network", "user", "--", "-m", "128")
    net.ok("start", vm["name"], "--paused", "--", "-vnc", "7", user=alice)
    info = net.json("vnc", vm["name"], user=alice)
    assert info["kind"] == "tcp" and info["host"] == "127.0.0.1" and info["port"] == 5907
    assert len(info["password"]) == 8
    assert _rfb(net, "5907", alice).strip() == "types [2]"  # VNC authentication required, even for the owner
    assert _rfb(net, "5907", None).strip() == "types [2]"
    assert _rfb(net, "5907", bob).startswith("refused ConnectionRefusedError")  # others cannot even connect
    listeners = net.sh("ss", "-Hltn").stdout
    assert "127.0.0.1:5907 " in listeners and not re.search(r"(0\.0\.0\.0|\*|\[::\]):5907", listeners)
    assert net.kvmgate("vnc", vm["name"], user=bob).returncode == 4  # the password is the owner's
    net.ok("stop", vm["name"], "--force", user=alice)
    net.ok("start", vm["name"], "--paused", "--", "-vnc", "7", user=alice)
    assert net.json("vnc", vm["name"], user=alice)["password"] != info["password"]  # new at every start


# --------------------------------------------------------------------- concurrency


def test_twenty_vms_get_distinct_ports_macs_addresses_and_taps(net: Net, vms: list, alice: str) -> None:
    names = [name() for _ in range(20)]

    def make(n: str) -> subprocess.CompletedProcess[str]:
        return net.kvmgate(
            "admin", "create", n, "--owner", alice, "--network", "services,user", "--forward", "ssh", "--", "-m", "64"
        )

    def start(n: str) -> subprocess.CompletedProcess[str]:
        return net.kvmgate("start", n, "--paused", user=alice)

    def allocated() -> list[dict]:
        return [net.json("admin", "show", n, "--owner", alice) for n in names]  # type: ignore[misc]

    with ThreadPoolExecutor(20) as pool:
        made = list(pool.map(make, names))
    vms.extend((alice, n) for n in names)
    assert all(r.returncode == 0 for r in made), [r.stderr for r in made if r.returncode]
    with ThreadPoolExecutor(20) as pool:
        started = list(pool.map(start, names))
    assert all(r.returncode == 0 for r in started), [r.stderr for r in started if r.returncode]

    shown = allocated()
    ports = {s["forwards"][0]["port"] for s in shown}
    macs = {n["mac"] for s in shown for n in s["nics"]}
    assert len(ports) == 20 and len(macs) == 40
    assert len({s["nics"][0]["ip"] for s in shown}) == 20 and len({s["nics"][0]["tap"] for s in shown}) == 20
    # ...and that is what runs: QEMU's command lines, the listeners, the bridge's ports.
    running = set()
    for s in shown:
        argv = Path(f"/proc/{s['pid']}/cmdline").read_bytes().decode()
        running |= set(re.findall(r'"mac":"([0-9a-f:]{17})"', argv))
    assert running == macs
    listeners = net.sh("ss", "-Hltn").stdout
    assert all(f"127.0.0.1:{p} " in listeners for p in ports)
    assert len(re.findall(r"master ktsvc0", net.sh("bridge", "link", "show").stdout)) == 20

    # Deleting frees everything; re-creating reuses the same pool values.
    for n in names:
        net.ok("stop", n, "--owner", alice, "--force")
        net.ok("admin", "delete", n, "--owner", alice)
    vms.clear()
    assert not [ln for ln in net.links() if re.fullmatch(r"ktt\d+", ln)]
    with ThreadPoolExecutor(20) as pool:
        assert all(r.returncode == 0 for r in pool.map(make, names))
    vms.extend((alice, n) for n in names)
    again = allocated()
    assert {s["forwards"][0]["port"] for s in again} == ports
    assert {s["nics"][0]["ip"] for s in again} == {s["nics"][0]["ip"] for s in shown}


# ----------------------------------------------------------------------- bad input


def test_bad_network_input_is_refused_and_builds_nothing(
    net: Net, vms: list, kg: Kvmgate, alice: str, guest: Path
) -> None:
    vm = create(net, vms, alice, name(), "--network", "services,user", "--", *boot(guest))
    net.ok("admin", "net-up")
    links, snap, rules = net.links(), kg.state_snapshot(), net.sh("nft", "list", "ruleset").stdout

    def unchanged() -> None:
        assert net.links() == links
        assert kg.state_snapshot() == snap
        assert net.sh("nft", "list", "ruleset").stdout == rules

    cases = [
        (["admin", "create", name(), "--owner", alice, "--forward", "ssh@80"], None, "within the pool 21000-21999"),
        (["admin", "create", name(), "--owner", alice, "--forward", "ssh@30000"], None, "within the pool"),
        (["admin", "create", name(), "--owner", alice, "--network", "nosuch"], None, "no network 'nosuch'"),
        (
            ["admin", "create", name(), "--owner", alice, "--network", "services", "--forward", "ssh"],
            None,
            "needs the user network",
        ),
        (["admin", "create", name(), "--owner", alice, "--network", "user", "--", "-net", "nic"], None, "not both"),
        (["admin", "create", name(), "--owner", alice, "--", "-redir", "tcp:80::22"], None, "outside the pool"),
        (["admin", "set", vm["name"], "--owner", alice, "--wake", "on"], None, "needs forwarded ports"),
        (["start", vm["name"], "--", "-net", "user"], alice, "-net: only the administrator"),
        (["start", vm["name"], "--", "-netdev", "user,id=x"], alice, "-netdev: unknown option"),
        (["start", vm["name"], "--", "-redir", "tcp:21010::22"], alice, "-redir: only the administrator"),
        (["start", vm["name"], "--", "-device", "e1000"], alice, "-device: unknown option"),
        (["start", vm["name"], "--", "-vnc", "0"], alice, "display must be between"),
        (["start", vm["name"], "--", "-vnc", "0.0.0.0:1"], alice, "-vnc"),
        (["start", vm["name"], "--", "-tftp", "/tmp"], alice, "-tftp: only the administrator"),
    ]
    for args, user, message in cases:
        r = net.kvmgate(*args, user=user)
        assert r.returncode == 3 and message in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        unchanged()

    # A port already given to another VM.
    net.ok("admin", "set", vm["name"], "--owner", alice, "--forward", "ssh@21500")
    links, snap, rules = net.links(), kg.state_snapshot(), net.sh("nft", "list", "ruleset").stdout
    r = net.kvmgate("admin", "create", name(), "--owner", alice, "--forward", "http@21500")
    assert r.returncode == 3 and "already assigned to another VM" in r.stderr
    unchanged()

    # QEMU itself failing after the taps were made: the taps go with it.
    r = net.kvmgate("start", vm["name"], "--", "-loadvm", "nosuch", user=alice)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert net.links() == links and net.sh("nft", "list", "ruleset").stdout == rules  # (QEMU's log is kept)
    snap = kg.state_snapshot()

    # An admin's bridge name longer than IFNAMSIZ: the policy is refused as a whole.
    Path(ETC, "policy.toml").write_text(DEFAULT_POLICY.replace('bridge = "ktsvc0"', 'bridge = "ktservicesbridge0"'))
    for args in (["admin", "net-up"], ["admin", "create", name(), "--owner", alice, "--network", "services"]):
        r = net.kvmgate(*args)
        assert r.returncode == 3 and "longer than 15 characters (IFNAMSIZ)" in r.stderr, r.stderr
        unchanged()


def test_tftp_directory_is_checked_with_the_owners_rights(kg: Kvmgate, alice: str, vms: list, net: Net) -> None:
    secret = Path(f"/srv/kgt-{secrets.token_hex(3)}")
    secret.mkdir(mode=0o700)
    try:
        vm = create(net, vms, alice, name(), "--", "-m", "64", "-net", "nic", "-net", "user", "-tftp", str(secret))
        r = net.kvmgate("start", vm["name"], user=alice)
        assert r.returncode == 3 and "-tftp: cannot open the directory" in r.stderr
        assert net.json("status", vm["name"], user=alice)["state"] == "stopped"
        secret.chmod(0o755)
        net.ok("start", vm["name"], "--paused", user=alice)
    finally:
        secret.rmdir()


# --------------------------------------------------------------------- host set-up


def test_net_up_is_idempotent_and_comes_back_after_a_reboot(net: Net, vms: list, alice: str, guest: Path) -> None:
    vm = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    net.ok("admin", "net-up")
    state = (net.sh("nft", "list", "ruleset").stdout, net.links(), net.sh("ip", "-br", "addr").stdout)
    net.ok("admin", "net-up")
    assert (net.sh("nft", "list", "ruleset").stdout, net.links(), net.sh("ip", "-br", "addr").stdout) == state
    assert len([p for p in net.sh("ps", "-ewwo", "args").stdout.splitlines() if "--interface=ktsvc0" in p]) >= 1

    # A reboot, as far as kvmgate can tell: no bridge, no rules, no dnsmasq, an empty /run.
    net.ok("admin", "net-down")
    assert "ktsvc0" not in net.links() and "kvmgate_kt" not in net.sh("nft", "list", "tables").stdout
    Path(f"{RUN}/net.up").unlink(missing_ok=True)
    net.ok("start", vm["name"], user=alice)  # the first bridged start rebuilds the host side
    net.ok(
        "console",
        vm["name"],
        "--owner",
        alice,
        "--expect",
        rf"KVMGATE-GUEST-NET eth0 {vm['nics'][0]['ip']}\b",
        "--timeout",
        "120",
    )
    assert net.sh("nft", "list", "ruleset").stdout == state[0]


def test_a_bridged_vm_keeps_its_network_across_hibernate(net: Net, vms: list, alice: str, guest: Path) -> None:
    vm = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    ip, tap = vm["nics"][0]["ip"], vm["nics"][0]["tap"]
    up_with_address(net, alice, vm["name"], ip, alice)
    net.ok("hibernate", vm["name"], user=alice)
    assert tap not in net.links()  # the tap went with QEMU
    net.ok("start", vm["name"], user=alice)  # restore: a new tap, on the bridge, isolated, same MAC
    assert re.search(rf"{tap}:.*master ktsvc0.*\n.*isolated on", net.sh("bridge", "-d", "link", "show").stdout)
    out = net.guest(alice, vm["name"], "udhcpc -i eth0 -q -n -t 5 -T 1 -s /usr/share/udhcpc/default.script")
    assert f"lease of {ip} obtained" in out


def test_starting_a_running_bridged_vm_is_wrong_state_and_opens_nothing(
    net: Net, vms: list, alice: str, guest: Path
) -> None:
    """The review's bug: the tap was opened before the VM's lock, so this start died
    with EBUSY (exit 1). Now the state is checked first, under the VM's lock."""
    vm = create(net, vms, alice, name(), "--network", "private", "--", *boot(guest))
    net.ok("start", vm["name"], user=alice)
    links = net.links()
    r = net.kvmgate("start", vm["name"], user=alice)
    assert r.returncode == 5 and r.stderr.strip() == f"kvmgate: {vm['name']} is already running", r.stderr
    assert net.links() == links


def test_a_freed_address_is_leased_to_the_next_vm(net: Net, vms: list, alice: str, guest: Path) -> None:
    """dnsmasq would keep a deleted VM's address leased to its old MAC; kvmgate makes it forget."""
    first = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    up_with_address(net, alice, first["name"], first["nics"][0]["ip"], alice)
    net.ok("stop", first["name"], "--force", user=alice)
    net.ok("admin", "delete", first["name"], "--owner", alice)
    vms.remove((alice, first["name"]))
    second = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    assert second["nics"][0]["ip"] == first["nics"][0]["ip"] and second["nics"][0]["mac"] != first["nics"][0]["mac"]
    up_with_address(net, alice, second["name"], second["nics"][0]["ip"], alice)
    hosts = Path(f"{RUN}-net/services.hosts")  # every services VM's MAC and address: not for other users
    assert hosts.stat().st_mode & 0o007 == 0 and hosts.stat().st_uid == 0
    assert as_user(alice, ["cat", str(hosts)]).returncode != 0


def test_a_subverted_dnsmasq_cannot_aim_roots_signals(net: Net) -> None:
    """dnsmasq writes its pid file as `nobody`; a pid planted there (here: a process whose
    command line even says dnsmasq) must not be signalled by kvmgate."""
    net.ok("admin", "net-up")
    pidfile = Path(f"{RUN}-net/services.{os.stat(f'/run/netns/{net.ns}').st_ino}.pid")
    real = pidfile.read_text()
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "dnsmasq", f"--pid-file={pidfile}"])
    try:
        pidfile.write_text(f"{decoy.pid}\n")
        net.ok("admin", "net-down")
        time.sleep(0.3)
        assert decoy.poll() is None  # still alive: neither HUP nor TERM reached it
    finally:
        decoy.kill()
        decoy.wait()
        pidfile.write_text(real)
        net.kvmgate("admin", "net-down")
        net.ok("admin", "net-up")


def test_a_signal_between_stopping_and_restarting_dnsmasq_leaves_it_running(
    net: Net, vms: list, alice: str, guest: Path
) -> None:
    """Freeing an address restarts dnsmasq. A SIGTERM to the helper at that point
    (root's Ctrl-C, a unit's stop) once left the services network without DHCP."""
    first = create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    create(net, vms, alice, name(), "--network", "services", "--", *boot(guest))
    net.ok("admin", "net-up")
    pidfile = Path(f"{RUN}-net/services.{os.stat(f'/run/netns/{net.ns}').st_ino}.pid")
    with Pause("net:dnsmasq-stopped") as pause:
        p = subprocess.Popen(
            net.cmd([KVMGATE, "admin", "delete", first["name"], "--owner", alice]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        helper = pause.reached()
        os.kill(helper, signal.SIGTERM)
        pause.release()
        _, err = p.communicate(timeout=60)
    vms.remove((alice, first["name"]))
    assert p.returncode == 0, err
    pid = int(pidfile.read_text())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq", "DHCP is served again"


SQUAT = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
print("got a connection", flush=True)
"""

# On [::], v6-only: the kernel lets it sit beside QEMU's 127.0.0.1 socket, and /proc cannot tell it from dual-stack.
SQUAT6 = SQUAT.replace(
    "socket.socket()", "socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)"
).replace('"127.0.0.1"', '"::"')


def test_a_squatted_port_is_never_handed_to_the_squatter(
    net: Net, vms: list, alice: str, bob: str, guest: Path
) -> None:
    """Any local user can bind a free pool port. Bob listening on alice's stopped
    VM's ssh port once received her `kvmgate ssh`, and made her next start fail."""
    used = net.sh("ss", "-Htan").stdout  # earlier tests' connections linger in TIME-WAIT in this namespace
    port = next(p for p in range(21500, 22000) if f":{p} " not in used)
    vm = create(net, vms, alice, name(), "--forward", f"ssh@{port}", "--", *boot(guest, "kvmgate.ssh"))
    assert net.json("ports", vm["name"], user=alice)[0]["port"] == port
    squat = subprocess.Popen(
        net.cmd([sys.executable, "-c", SQUAT, str(port)], user=bob), stdout=subprocess.PIPE, text=True
    )
    try:
        assert squat.stdout is not None and squat.stdout.readline().strip() == "listening", net.sh("ss", "-Htan").stdout
        r = net.kvmgate("ssh", vm["name"], "--", *SSH_THROWAWAY, "true", user=alice)
        assert r.returncode == 5 and "is not held by the VM" in r.stderr, r.stderr
        r = net.kvmgate("start", vm["name"], user=alice)
        assert r.returncode == 0, r.stderr
        assert f"ssh: port {port} is held by another program; the VM now uses port " in r.stderr
        row = net.json("ports", vm["name"], user=alice)[0]
        assert row["port"] != port and row["held"] is True
        assert squat.poll() is None, "the squatter got nothing"
        # Bob on [::] (v6-only) at the new port takes no connection to 127.0.0.1: the port stays alice's.
        v6 = subprocess.Popen(
            net.cmd([sys.executable, "-c", SQUAT6, str(row["port"])], user=bob),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert v6.stdout is not None and v6.stdout.readline().strip() == "listening"
            assert net.json("ports", vm["name"], user=alice)[0]["held"] is True
        finally:
            v6.kill()
            v6.wait()
    finally:
        squat.kill()
        squat.wait()


def _full_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


def test_a_caller_who_never_reads_holds_no_lock(net: Net, vms: list, alice: str, bob: str, guest: Path) -> None:
    """A start whose stderr was a full pipe nobody read blocked writing its
    moved-port line while it held the VM's lock: every later operation on the VM
    (the logon worker's too) waited for ever. Root writes to a caller only once it
    holds nothing, and gives up on one who does not read (host.output)."""
    used = net.sh("ss", "-Htan").stdout
    port = next(p for p in range(21999, 21500, -1) if f":{p} " not in used)
    vm = create(net, vms, alice, name(), "--forward", f"ssh@{port}", "--", *boot(guest))
    squat = subprocess.Popen(
        net.cmd([sys.executable, "-c", SQUAT, str(port)], user=bob), stdout=subprocess.PIPE, text=True
    )
    r, w = _full_pipe()
    try:
        assert squat.stdout is not None and squat.stdout.readline().strip() == "listening"
        began = time.monotonic()
        p = subprocess.Popen(net.cmd([KVMGATE, "start", vm["name"]], user=alice), stdout=w, stderr=w)
        os.close(w)
        while net.json("status", vm["name"], user=alice)["state"] != "running":
            assert p.poll() is None and time.monotonic() < began + 60, "the start went on"
            time.sleep(0.2)
        stop = net.kvmgate("stop", vm["name"], "--force", user=alice)
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - began < 25, "the stop did not wait for the start's caller"
        assert p.wait(60) == 0, "the start's outcome stands, though nobody read it"
    finally:
        os.close(r)
        squat.kill()
        squat.wait()


def test_tcp_vnc_is_guarded_before_qemu_listens(net: Net, vms: list, alice: str, bob: str) -> None:
    """The owner-only rule once came after QEMU listened: others could connect in
    that window and keep the connection. It is loaded before QEMU is spawned."""
    Path(ETC, "policy.toml").write_text(DEFAULT_POLICY + '[vnc]\nmode = "tcp"\n')
    vm = create(net, vms, alice, name(), "--network", "user", "--", "-m", "128")
    with Pause("start:spawned") as pause:
        p = subprocess.Popen(net.cmd([KVMGATE, "start", vm["name"], "--paused", "--", "-vnc", "8"], user=alice))
        pause.reached()
        deadline = time.monotonic() + 30
        while "127.0.0.1:5908 " not in net.sh("ss", "-Hltn").stdout:
            assert time.monotonic() < deadline, "QEMU never listened"
            time.sleep(0.05)
        assert _rfb(net, "5908", bob).startswith("refused"), "bob cannot connect, even now"
        pause.release()
        assert p.wait(60) == 0
    assert net.json("vnc", vm["name"], user=alice)["port"] == 5908


def test_a_stopped_caller_never_holds_the_network_lock(net: Net, vms: list, alice: str, bob: str, guest: Path) -> None:
    """Ctrl-Z at the moment the helper held the network lock once stopped it there,
    and every other user's bridged start waited for the attacker. Whatever alice
    sends (Ctrl-Z to the helper, SIGTSTP and SIGSTOP to her own sudo), her helper
    keeps running, lets the lock go, and bob's start goes through."""
    mine = create(net, vms, alice, name(), "--network", "private", "--", *boot(guest))
    his = create(net, vms, bob, name(), "--network", "private", "--", *boot(guest))
    with Pause("lock:net.lock") as pause:
        p = subprocess.Popen(net.cmd([KVMGATE, "start", mine["name"]], user=alice))
        helper = pause.reached()
        sudo = parent_of(helper)
        os.kill(helper, signal.SIGTSTP)  # the terminal's Ctrl-Z reaches the whole group
        for sig in ("-TSTP", "-STOP"):
            assert net.sh("kill", sig, str(sudo), user=alice).returncode == 0
        time.sleep(0.3)
        with open(f"/proc/{helper}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T", "the helper is not stopped"
        q = subprocess.Popen(net.cmd([KVMGATE, "start", his["name"]], user=bob))
        pause.release()
        assert q.wait(60) == 0, "bob's start got the lock"
    for pid in (sudo, parent_of(sudo)):  # runuser stopped itself with its stopped child (job control)
        os.kill(pid, signal.SIGCONT)
    assert p.wait(60) == 0
