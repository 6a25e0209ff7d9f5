"""Service VMs that know who is calling (docs/services.md), end to end with three
real Debian guests on a services network inside a namespace this module makes
(test_networks' Net): a file server (guest/build-shares-guest.sh: NFS and Samba,
driven by guest/kvmgate-shares) that reads kvmgate's owner map, and alice's and
bob's own VMs, reached over real ssh logins with the owners' keys.

Each owner mounts their own NFS share and uses their own Samba share. Bob, root
in his guest, cannot reach alice's, neither as himself nor after taking her MAC
and address (the bridge drops his frames: a capture on the server's tap sees
none). Deleting a VM takes its address out of the shares within seconds; while
a server has not applied that map the address is held back from new VMs. The
server, restarted by `admin watch` after a crash, serves the same files again."""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import KVMGATE, REPO, RUN, Kvmgate, as_user, discard, run
from .test_networks import Net, net  # noqa: F401 - the namespace fixture

IMAGE = "kgshares"
SVC = "kvmgate-svc"
SERVER = "files"
BRIDGE = "ktsvc0"  # the services bridge of the suite's policy (conftest.DEFAULT_POLICY)


@pytest.fixture(scope="module")
def shares_image() -> Path:
    out = subprocess.run(["sh", str(REPO / "guest/build-shares-guest.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1]) / "debian.qcow2"


class Lab:
    def __init__(self, ns: Net, kg: Kvmgate, alice: str, bob: str, disk: str) -> None:
        self.net, self.kg, self.alice, self.bob, self.disk = ns, kg, alice, bob, disk
        self.made: list[tuple[str, str]] = []

    def create(self, owner: str, name: str, *args: str) -> dict:
        self.net.ok("admin", "create", name, "--owner", owner, *args)
        self.made.append((owner, name))
        return self.net.json("admin", "show", name, "--owner", owner)  # type: ignore[return-value]

    def user_vm(self, owner: str, name: str) -> dict:
        return self.create(owner, name, "--image", IMAGE, "--disk-size", "3G", "--network", "services,user",
                           "--forward", "ssh", "--", "-m", "384", "-nographic")  # fmt: skip

    def ssh(self, owner: str, name: str, command: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.net.kvmgate("ssh", name, "--", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", command,
                                user=owner, timeout=timeout)  # fmt: skip

    def wait_ssh(self, owner: str, name: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while (
            r := self.ssh(owner, name, "systemctl is-system-running --wait >/dev/null; echo up")
        ).stdout.strip() != "up":
            assert time.monotonic() < deadline, f"no ssh login to {owner}/{name}: {r.stderr[-500:]}"
            time.sleep(3)

    def map(self) -> dict:
        return self.net.json("admin", "owner-map")  # type: ignore[return-value]

    def wait_applied(self, seconds: float = 120) -> dict:
        """Until the live server has applied the published map."""
        deadline = time.monotonic() + seconds
        while True:
            m = self.map()
            live = [s for s in m["servers"] if s["live"]]
            if live and all(s["applied"] == m["generation"] for s in live):
                return m
            assert time.monotonic() < deadline, f"the server never applied the map: {m}"
            time.sleep(0.5)

    def ip(self, owner: str, name: str) -> str:
        show = self.net.json("admin", "show", name, "--owner", owner)
        return next(n["ip"] for n in show["nics"] if n["network"] == "services")  # type: ignore[index]

    def server_log(self) -> str:
        return self.net.ok("log", SERVER, "--owner", SVC, "--lines", "400").stdout


@pytest.fixture(scope="module")
def lab(net: Net, kg: Kvmgate, users, shares_image: Path) -> Iterator[Lab]:  # noqa: F811
    alice, bob = users.make("kga"), users.make("kgb")
    for u in (alice, bob):
        key = f"{pwd.getpwnam(u).pw_dir}/.ssh/id_ed25519"
        as_user(u, ["mkdir", "-p", "-m", "700", os.path.dirname(key)], check=True)
        as_user(u, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    kg("admin", "image", "remove", IMAGE)
    kg.ok("admin", "image", "add", IMAGE, str(shares_image), "--cloud-init")
    # The shares' disk: the admin's file, in a directory of their choosing, owned by the server's account.
    d = Path(tempfile.mkdtemp(prefix="kgshares-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    disk = str(d / "files.raw")
    os.truncate(os.open(disk, os.O_CREAT | os.O_WRONLY, 0o600), 256 << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "kvmshares", disk], check=True)
    lab = Lab(net, kg, alice, bob, disk)
    net.ok("admin", "create", SERVER, "--service", "--no-autostart", "--owner-map", "on", "--image", IMAGE,
           "--cloud-init", "off", "--disk-size", "3G", "--network", "services",
           "--", "-m", "384", "-nographic", "-hdb", disk)  # fmt: skip
    lab.made.append((SVC, SERVER))
    os.chown(disk, pwd.getpwnam(SVC).pw_uid, -1)
    yield lab
    for owner, name in reversed(lab.made):
        discard(net.kvmgate, owner, name)
    kg("admin", "image", "remove", IMAGE)
    shutil.rmtree(d, ignore_errors=True)


def test_the_owner_map_is_refused_where_it_means_nothing(lab: Lab) -> None:
    r = lab.net.kvmgate("admin", "create", "nomap", "--owner", lab.alice, "--owner-map", "on", "--network", "services")
    assert r.returncode == 3 and "service VMs" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = lab.net.kvmgate("admin", "create", "nomap", "--service", "--owner-map", "on", "--network", "user")
    assert r.returncode == 3 and "services network" in r.stderr, r.stderr
    assert lab.net.kvmgate("admin", "show", "nomap", "--owner", SVC).returncode == 4


def test_each_owner_uses_their_own_shares_and_nobody_elses(lab: Lab) -> None:
    a1 = lab.user_vm(lab.alice, "a1")
    b1 = lab.user_vm(lab.bob, "b1")
    for owner, name in ((SVC, SERVER), (lab.alice, "a1"), (lab.bob, "b1")):
        lab.net.ok("start", name, "--owner", owner)
    m = lab.wait_applied(240)
    assert {(r["owner"], r["name"]) for r in m["rows"]} >= {(lab.alice, "a1"), (lab.bob, "b1")}
    svc = lab.ip(SVC, SERVER)
    for owner, name in ((lab.alice, "a1"), (lab.bob, "b1")):
        lab.wait_ssh(owner, name)
    nfs = f"sudo mount -t nfs4 -o soft,timeo=30,retrans=1 {svc}:/srv/shares/{{owner}} /mnt"
    # Alice writes to her NFS share and her Samba share.
    r = lab.ssh(lab.alice, "a1", nfs.format(owner=lab.alice) + " && echo alice-nfs | sudo tee /mnt/from-nfs"
                " && ls -ln /mnt && sudo umount /mnt")  # fmt: skip
    assert r.returncode == 0 and "alice-nfs" in r.stdout, r.stderr
    assert re.search(r"\b2000\d\b", r.stdout), "squashed to the share's own account, not the guest's root"
    r = lab.ssh(
        lab.alice, "a1", f"echo alice-smb > /tmp/s && smbclient -N //{svc}/{lab.alice} -c 'put /tmp/s from-smb; ls'"
    )
    assert r.returncode == 0 and "from-smb" in r.stdout and "from-nfs" in r.stdout, r.stderr + r.stdout
    # Bob, root in his own guest: his share works, hers does not, by either protocol.
    r = lab.ssh(lab.bob, "b1", nfs.format(owner=lab.bob) + " && sudo touch /mnt/bobs && sudo umount /mnt")
    assert r.returncode == 0, r.stderr
    r = lab.ssh(lab.bob, "b1", nfs.format(owner=lab.alice) + "; echo rc=$?; ls /mnt")
    assert "rc=0" not in r.stdout and "from-nfs" not in r.stdout, r.stdout
    r = lab.ssh(
        lab.bob, "b1", f"sudo mount -t nfs4 -o soft,timeo=30,retrans=1 {svc}:/ /mnt; ls -R /mnt; sudo umount /mnt"
    )
    assert lab.alice not in r.stdout, "the NFSv4 pseudo-root shows bob no one else's share"
    r = lab.ssh(lab.bob, "b1", f"smbclient -N //{svc}/{lab.alice} -c ls; echo rc=$?")
    assert "from-smb" not in r.stdout and "rc=0" not in r.stdout, r.stdout
    r = lab.ssh(lab.bob, "b1", f"smbclient -N -L //{svc}; echo rc=$?")
    assert lab.alice not in r.stdout, "shares are not listed"
    # NFSv4 only: no portmapper, no mountd, so no export list (with its addresses) for anyone.
    r = lab.ssh(
        lab.bob,
        "b1",
        f"PATH=$PATH:/usr/sbin; echo have=$(command -v rpcinfo showmount | wc -l); rpcinfo -p {svc}; echo rpc=$?; "
        f"showmount -e {svc}; echo show=$?",
    )
    assert "have=2" in r.stdout and "rpc=0" not in r.stdout and "show=0" not in r.stdout, r.stdout
    assert lab.alice not in r.stdout + r.stderr, r.stdout
    r = lab.ssh(lab.bob, "b1", f"smbclient -N //{svc}/{lab.bob} -c ls")
    assert r.returncode == 0 and "bobs" in r.stdout and "from-smb" not in r.stdout, r.stderr + r.stdout
    del a1, b1


def test_bob_posing_as_alice_is_dropped_by_the_bridge(lab: Lab) -> None:
    svc = lab.ip(SVC, SERVER)
    alice_ip = lab.ip(lab.alice, "a1")
    alice_mac = next(n["mac"] for n in lab.net.json("admin", "show", "a1", "--owner", lab.alice)["nics"]  # type: ignore[index]
                     if n["network"] == "services")  # fmt: skip
    bob_mac = next(n["mac"] for n in lab.net.json("admin", "show", "b1", "--owner", lab.bob)["nics"]  # type: ignore[index]
                   if n["network"] == "services")  # fmt: skip
    server_tap = next(n["tap"] for n in lab.net.json("admin", "show", SERVER, "--owner", SVC)["nics"])  # type: ignore[index]
    bob_tap = next(n["tap"] for n in lab.net.json("admin", "show", "b1", "--owner", lab.bob)["nics"]  # type: ignore[index]
                   if n["network"] == "services")  # fmt: skip
    lab.net.ok("freeze", "a1", "--owner", lab.alice)  # alice's VM is silent: any frame from her address is bob's
    try:
        at_server, at_bob = lab.net.sniff(server_tap, 45), lab.net.sniff(bob_tap, 45)
        spoof = (
            f"dev=$(ip -o link | awk -F': ' '/{bob_mac}/{{print $2}}'); "
            f"sudo ip link set $dev down; sudo ip link set $dev address {alice_mac}; sudo ip link set $dev up; "
            f"sudo ip addr flush dev $dev; sudo ip addr add {alice_ip}/24 dev $dev; "
            f"sudo timeout 15 mount -t nfs4 -o soft,timeo=10,retrans=1 {svc}:/srv/shares/{lab.alice} /mnt; "
            f"echo nfs=$?; timeout 15 smbclient -N //{svc}/{lab.alice} -c ls; echo smb=$?; "
            f"sudo ip link set $dev down; sudo ip link set $dev address {bob_mac}; sudo ip link set $dev up"
        )
        r = lab.ssh(lab.bob, "b1", spoof, timeout=120)
        assert "nfs=0" not in r.stdout and "smb=0" not in r.stdout and "from-nfs" not in r.stdout, r.stdout
        sent, arrived = lab.net.frames(at_bob), lab.net.frames(at_server)
        assert [f for f in sent if f["src"] == alice_mac], "bob's guest did send frames as alice"
        assert not [f for f in arrived if f["ip_src"] == alice_ip or f["src"] == alice_mac], arrived[:5]
    finally:
        lab.net.ok("thaw", "a1", "--owner", lab.alice)


# A DHCP client message as a guest's root can write it: any chaddr, any type (4 DECLINE, 7 RELEASE, 8 INFORM).
DHCP_LIE = r"""
import socket, struct, sys
dev, src_mac, src_ip, chaddr, asked, server, kind = sys.argv[1:]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
mac, ip = (lambda m: bytes.fromhex(m.replace(":", ""))), socket.inet_aton
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x4B474B47, 0, 0, ip(src_ip), bytes(4), bytes(4),
                    bytes(4), mac(chaddr).ljust(16, b"\0"), bytes(64), bytes(128))
opts = b"\x63\x82\x53\x63" + bytes([53, 1, int(kind), 50, 4]) + ip(asked) + bytes([54, 4]) + ip(server) + b"\xff"
udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp) + len(opts), 0) + bootp + opts
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, ip(src_ip), ip("255.255.255.255"))
hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
for _ in range(3):
    s.send(b"\xff" * 6 + mac(src_mac) + b"\x08\x00" + hdr + udp)
print("sent", kind)
"""


def test_bobs_guest_cannot_take_alices_address_away_through_dhcp(lab: Lab) -> None:
    """dnsmasq believes a DECLINE or RELEASE about the MAC in its payload: the bridge lets a
    tap speak only for its own MAC there (found by a trial attack: a DECLINE naming alice's
    MAC kept her, or the file server, without an address for ten minutes)."""
    nic = {o: next(n for n in lab.net.json("admin", "show", v, "--owner", o)["nics"]  # type: ignore[index]
                   if n["network"] == "services") for o, v in ((lab.alice, "a1"), (lab.bob, "b1"))}  # fmt: skip
    alice, bob = nic[lab.alice], nic[lab.bob]
    gateway = alice["ip"].rsplit(".", 1)[0] + ".1"
    script = base64.b64encode(DHCP_LIE.encode()).decode()
    lab.net.ok("freeze", "a1", "--owner", lab.alice)
    try:
        seen_at_host = lab.net.sniff(BRIDGE, 40)  # the host's side of the bridge: what dnsmasq receives
        lie = f"dev=$(ip -o link | awk -F': ' '/{bob['mac']}/{{print $2}}'); echo {script} | base64 -d > /tmp/lie.py"
        for src, chaddr, kind in (
            ("0.0.0.0", alice["mac"], 4),
            (bob["ip"], alice["mac"], 7),
            (bob["ip"], bob["mac"], 8),
        ):
            lie += f"; sudo python3 /tmp/lie.py $dev {bob['mac']} {src} {chaddr} {alice['ip']} {gateway} {kind}"
        r = lab.ssh(lab.bob, "b1", lie)
        assert r.stdout.count("sent") == 3, r.stderr + r.stdout
        seen = [f["chaddr"] for f in lab.net.frames(seen_at_host) if f["chaddr"]]
        assert bob["mac"] in seen, "the sniffer sees what the bridge lets through (bob's INFORM about himself)"
        assert alice["mac"] not in seen, "a DECLINE or RELEASE naming alice's MAC never reaches dnsmasq"
    finally:
        lab.net.ok("thaw", "a1", "--owner", lab.alice)


def test_the_server_hibernates_and_serves_again_after_restore(lab: Lab) -> None:
    """The map is a disk, not a 9p export, so nothing blocks the server's migration."""
    lab.user_vm(lab.alice, "t1")
    freed = lab.ip(lab.alice, "t1")
    lab.wait_applied()
    lab.net.ok("hibernate", SERVER, "--owner", SVC)
    assert [s["live"] for s in lab.map()["servers"]] == [True], "a hibernated server still holds addresses back"
    lab.net.ok("admin", "delete", "t1", "--owner", lab.alice)
    lab.made.remove((lab.alice, "t1"))
    lab.user_vm(lab.bob, "t2")
    assert lab.ip(lab.bob, "t2") != freed, "the hibernated server still serves alice's old address"
    lab.net.ok("start", SERVER, "--owner", SVC)
    m = lab.wait_applied(60)
    assert not m["quarantine"], "applied after the restore: released"
    lab.net.ok("admin", "delete", "t2", "--owner", lab.bob)
    lab.made.remove((lab.bob, "t2"))
    svc = lab.ip(SVC, SERVER)
    r = lab.ssh(lab.alice, "a1", f"sudo mount -t nfs4 -o soft,timeo=30,retrans=1 {svc}:/srv/shares/{lab.alice} /mnt"
                " && cat /mnt/from-nfs; sudo umount /mnt")  # fmt: skip
    assert "alice-nfs" in r.stdout, r.stderr + r.stdout


def test_a_deleted_vms_address_leaves_the_shares_and_is_held_until_applied(lab: Lab) -> None:
    lab.user_vm(lab.alice, "a2")  # a second VM of alice's, stopped: its address is in the map too
    old = lab.ip(lab.alice, "a2")
    lab.wait_applied()
    # While the server is frozen it cannot apply a new map: the freed address is held back.
    lab.net.ok("freeze", SERVER, "--owner", SVC)
    lab.net.ok("admin", "delete", "a2", "--owner", lab.alice)
    lab.made.remove((lab.alice, "a2"))
    m = lab.map()
    assert {"network": "services", "ip": old} in [{k: q[k] for k in ("network", "ip")} for q in m["quarantine"]], m
    b2 = lab.user_vm(lab.bob, "b2")
    assert lab.ip(lab.bob, "b2") != old, "a held-back address is never handed out"
    lab.net.ok("thaw", SERVER, "--owner", SVC)
    t0 = time.monotonic()
    m = lab.wait_applied(30)
    assert time.monotonic() - t0 < 10, "applied within seconds of the thaw"
    assert not m["quarantine"], m
    line = lab.server_log().rsplit(f"generation {m['generation']}:", 1)[1].splitlines()[0]
    assert f"{lab.alice}=" in line and old not in line, line
    lab.net.ok("admin", "delete", "b2", "--owner", lab.bob)
    lab.made.remove((lab.bob, "b2"))
    del b2
    b3 = lab.user_vm(lab.bob, "b3")  # now the address may go to the next VM, bob's
    lab.wait_applied()
    assert lab.ip(lab.bob, "b3") == old
    lab.net.ok("admin", "delete", "b3", "--owner", lab.bob)
    lab.made.remove((lab.bob, "b3"))
    del b3


def test_the_map_disks_are_roots_and_admin_owner_map_reports_them(lab: Lab) -> None:
    key = lab.net.json("admin", "show", SERVER, "--owner", SVC)["key"]  # type: ignore[index]
    d = Path(RUN, key)
    for name in ("ownermap", "ownerack"):
        st = os.stat(d / name)
        assert st.st_uid == 0 and st.st_mode & 0o077 == 0, name
    assert os.stat(d / "ownerack").st_size == 4096
    m = lab.wait_applied()
    assert m["generation"] >= 1 and m["servers"][0]["server"] == f"{SVC}/{SERVER}" and not m["fenced"]
    text = lab.net.ok("admin", "owner-map").stdout
    assert f"server {SVC}/{SERVER}: applied {m['generation']}" in text, text


def test_the_server_restarted_by_admin_watch_serves_the_same_shares(lab: Lab) -> None:
    svc = lab.ip(SVC, SERVER)
    lab.net.ok("stop", SERVER, "--owner", SVC, "--force")
    watcher = subprocess.Popen(lab.net.cmd([KVMGATE, "admin", "watch", f"{SVC}:{SERVER}"]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lab.wait_applied(240)
        pid = int(Path(RUN, lab.net.json("admin", "show", SERVER, "--owner", SVC)["key"], "pid").read_text().split()[0])  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)  # a crash: the watcher fails, and its unit would start it again
        assert watcher.wait(60) == 7
        watcher = subprocess.Popen(lab.net.cmd([KVMGATE, "admin", "watch", f"{SVC}:{SERVER}"]),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        lab.wait_applied(240)
        r = lab.ssh(lab.alice, "a1", f"sudo mount -t nfs4 -o soft,timeo=30,retrans=1 {svc}:/srv/shares/{lab.alice} /mnt"
                    " && cat /mnt/from-nfs /mnt/from-smb; sudo umount /mnt")  # fmt: skip
        assert "alice-nfs" in r.stdout and "alice-smb" in r.stdout, r.stderr + r.stdout
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(120)
