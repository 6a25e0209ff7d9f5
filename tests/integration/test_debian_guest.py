"""The note's first logon path with a real Linux guest, end to end, as real users
over real ssh logins to the host: a Debian 12 cloud-style image built from the
apt mirror (guest/build-debian-guest.sh: systemd, sshd, qemu-guest-agent, a
NoCloud first-boot script), put in the library by the admin, a VM made from it
with a forwarded ssh port, the guest agent and the hibernate policy. The owner
logs on to the host, starts it, and logs in to it with their own key; logs off
(hibernated) and on (restored: their file is there and the guest's clock is
right); another user cannot reach the guest; -snapshot changes neither the
overlay nor the image. One boot for the module, reused through hibernate."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import KVMGATE, REPO, Kvmgate, as_user, discard
from .test_ssh_logon import Sshd

VM = "deb"
IMAGE = "debian12"


@pytest.fixture(scope="module")
def debian() -> Path:
    out = subprocess.run(["sh", str(REPO / "guest/build-debian-guest.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1]) / "debian.qcow2"


class Journey:
    def __init__(self, kg: Kvmgate, sshd: Sshd, owner: str) -> None:
        self.kg, self.sshd, self.owner = kg, sshd, owner
        self.held: subprocess.Popen[bytes] | None = None

    def logon(self) -> None:
        """A session that stays open (as a user at their terminal)."""
        self.held = self.sshd.popen(self.owner, "sleep 900")

    def logoff(self) -> None:
        assert self.held is not None
        self.held.terminate()
        self.held.wait(30)
        self.held = None

    def host(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A one-shot command in a new ssh login to the host, as the owner."""
        return self.sshd.run(self.owner, command, timeout=timeout)

    def guest(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`kvmgate ssh` into the guest, from a login on the host."""
        return self.host(f"{KVMGATE} ssh {VM} -- -o BatchMode=yes -o ConnectTimeout=10 '{command}'", timeout)

    def state(self) -> str:
        return str(self.kg.json("status", VM, "--owner", self.owner)["state"])  # type: ignore[index]

    def wait_state(self, want: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while (got := self.state()) != want:
            assert time.monotonic() < deadline, f"{VM} is {got}, not {want}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def journey(kg: Kvmgate, users, sshd: Sshd, debian: Path) -> Iterator[Journey]:
    owner = users.make("kgd")
    sshd.authorize(owner)
    # The owner's own key for the guest (their host login key is in authorized_keys too).
    key = f"{pwd.getpwnam(owner).pw_dir}/.ssh/id_ed25519"
    as_user(owner, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    kg.ok("admin", "init", "--pam")
    kg("admin", "image", "remove", IMAGE)
    kg.ok("admin", "image", "add", IMAGE, str(debian), "--cloud-init")
    kg.ok("admin", "create", VM, "--owner", owner, "--image", IMAGE, "--disk-size", "3G", "--forward", "ssh",
          "--guest-agent", "on", "--on-logoff", "hibernate", "--logoff-delay", "2",
          "--", "-m", "512", "-nographic")  # fmt: skip
    j = Journey(kg, sshd, owner)
    yield j
    if j.held is not None:
        j.logoff()
    discard(kg, owner, VM)
    kg("admin", "image", "remove", IMAGE)
    kg("admin", "init", "--no-pam")


def test_the_owner_starts_it_and_logs_in_with_their_own_key(journey: Journey) -> None:
    j = journey
    j.logon()
    r = j.host(f"{KVMGATE} start {VM}")
    assert r.returncode == 0 and f"started {VM}" in r.stdout, r.stderr
    deadline = time.monotonic() + 180
    while True:
        r = j.guest("cat /etc/hostname")
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, f"no ssh login to the guest: {r.stderr[-500:]}"
        time.sleep(3)
    assert r.stdout.strip() == VM, "the seed's hostname"
    assert j.guest("id -un").stdout.strip() == j.owner, "logged in as the owner's own account, with their key"
    keys = j.kg.json("keys", VM, "--owner", j.owner)
    assert len(keys["keys"]) >= 2  # type: ignore[index]
    home = pwd.getpwnam(j.owner).pw_dir
    found = as_user(j.owner, ["ssh-keygen", "-F", f"kvmgate-{j.owner}-{VM}", "-f", f"{home}/.ssh/known_hosts"])
    assert found.returncode == 0 and "ssh-ed25519" in found.stdout, "its host key, under the VM's own alias"


def test_another_user_cannot_reach_the_guest(journey: Journey, kg: Kvmgate, users) -> None:
    j = journey
    port = next(r["port"] for r in kg.json("ports", VM, "--owner", j.owner) if r["service"] == "ssh")  # type: ignore[union-attr,index]
    other = users.make("kgo")
    r = kg("ssh", "--owner", j.owner, VM, user=other)
    assert r.returncode in (3, 4), r.stderr
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(3)\n"
        f"try:\n s.connect(('127.0.0.1',{port})); print(s.recv(64))\n"
        "except OSError as e: print('refused', e)\n"
    )
    out = as_user(other, ["/usr/bin/python3", "-c", probe]).stdout
    assert "SSH-" not in out and "refused" in out, out


def test_logoff_hibernates_and_logon_restores_with_the_file_and_the_right_clock(journey: Journey) -> None:
    j = journey
    r = j.guest("echo hello-from-guest > ~/f && sync && echo ok")
    assert r.stdout.strip() == "ok", r.stderr
    j.logoff()
    j.wait_state("hibernated", 180)
    time.sleep(8)  # the guest's clock stands still meanwhile: without the agent it would be 8 s behind
    j.logon()
    j.wait_state("running", 180)
    assert j.guest("cat ~/f").stdout.strip() == "hello-from-guest"
    before = time.time()
    r = j.guest("date +%s.%N")
    after = time.time()
    guest_now = float(r.stdout.strip())
    assert before - 1.0 <= guest_now <= after + 1.0, f"guest clock {guest_now - (before + after) / 2:+.1f} s off"


def test_snapshot_over_the_overlay_changes_neither_it_nor_the_image(journey: Journey, kg: Kvmgate) -> None:
    j = journey
    j.guest("sync")
    kg.ok("stop", VM, "--owner", j.owner, "--force")  # a systemd guest under TCG takes minutes to power down
    disk = Path(kg.json("status", VM, "--owner", j.owner)["directory"], "disks", "disk0.qcow2")  # type: ignore[index]
    image = Path(next(x["path"] for x in kg.json("admin", "image", "list") if x["name"] == IMAGE))  # type: ignore[union-attr,index]

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    before = digest(disk), digest(image)
    r = j.host(f"{KVMGATE} start {VM} -- -snapshot")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 180
    while (r := j.guest("echo scratch > ~/scratch && sync && echo written")).stdout.strip() != "written":
        assert time.monotonic() < deadline, r.stderr[-300:]
        time.sleep(3)
    kg.ok("stop", VM, "--owner", j.owner, "--force")
    assert (digest(disk), digest(image)) == before


def test_the_seed_is_refused_in_one_line_when_the_key_file_is_a_fifo(journey: Journey, kg: Kvmgate) -> None:
    """(the busybox guest covers every bad key file; one here, on the real journey)"""
    j = journey
    home = pwd.getpwnam(j.owner).pw_dir
    keys = Path(home, ".ssh", "authorized_keys")
    saved = keys.read_bytes()
    keys.unlink()
    os.mkfifo(keys)
    os.chown(keys, pwd.getpwnam(j.owner).pw_uid, -1)
    try:
        r = kg("start", VM, "--owner", j.owner)
        assert r.returncode == 3 and "not a regular file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert j.state() == "stopped"
    finally:
        keys.unlink()
        keys.write_bytes(saved)
        os.chown(keys, pwd.getpwnam(j.owner).pw_uid, -1)
    assert json.loads(kg.ok("keys", VM, "--owner", j.owner, "--json").stdout)["keys"]
