"""The design note's first logon path, end to end: a real user logs on to the
host by ssh (sshd on loopback, key authentication), starts their VM through the
wrapper with an ISO and -snapshot, reads the boot line from the console in a
later session (the VM outlived the first one), and stops it."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ..conftest import KVMGATE, SSH_THROWAWAY, Kvmgate, boot_options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = _free_port()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "hostkey")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "userkey")], check=True)
        (workdir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {workdir}/hostkey\nPidFile {workdir}/sshd.pid\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nUsePAM yes\nStrictModes yes\nPrintMotd no\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(workdir / "sshd.log", "w") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(workdir / "sshd_config")],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not come up: " + (workdir / "sshd.log").read_text())

    def authorize(self, user: str) -> None:
        pw = pwd.getpwnam(user)
        ssh = Path(pw.pw_dir, ".ssh")
        ssh.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(self.dir / "userkey.pub", ssh / "authorized_keys")
        for p in (ssh, ssh / "authorized_keys"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        (ssh / "authorized_keys").chmod(0o600)

    def command(self, user: str, command: str) -> list[str]:
        return [
            "ssh",
            "-T",
            "-i",
            str(self.dir / "userkey"),
            "-p",
            str(self.port),
            *SSH_THROWAWAY,
            "-o",
            "LogLevel=ERROR",
            f"{user}@127.0.0.1",
            command,
        ]

    def run(self, user: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(user, command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def popen(self, user: str, command: str) -> subprocess.Popen[bytes]:
        """A session that stays open while the command runs."""
        return subprocess.Popen(self.command(user, command), stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_first_logon_path_over_ssh(
    kg: Kvmgate, users, sshd: Sshd, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    user = users.make("kgs")
    sshd.authorize(user)
    pw = pwd.getpwnam(user)
    for src, dst in ((guest / "cd.iso", "x.iso"), (guest / "disk.raw", "disk.img")):
        shutil.copy(src, Path(pw.pw_dir, dst))
        os.chown(Path(pw.pw_dir, dst), pw.pw_uid, pw.pw_gid)
    disk_hash = hashlib.sha256(Path(pw.pw_dir, "disk.img").read_bytes()).hexdigest()
    kg.ok("admin", "create", vm_name, "--owner", user, "--", *boot_options(guest))
    cleanup_vms.append((user, vm_name))

    r = sshd.run(user, f"{KVMGATE} start {vm_name} -- -cdrom ~/x.iso -hda disk.img -snapshot")
    assert r.returncode == 0, r.stderr
    assert f"started {vm_name}" in r.stdout

    # a new session: the VM outlived the one that started it
    r = sshd.run(user, f"{KVMGATE} console {vm_name} --expect 'KVMGATE-GUEST-READY[^\\r\\n]*[\\r\\n]' --timeout 120")
    assert r.returncode == 0, r.stderr
    assert "cdrom=test-cd" in r.stdout and "disk=test-disk" in r.stdout

    # the guest writes to its disk; with -snapshot the image itself never changes
    r = sshd.run(
        user,
        f"printf 'echo changed > /mnt/kvmgate-disk; sync; echo wr''ote\\n' | "
        f"{KVMGATE} console {vm_name} --expect wrote --timeout 30",
    )
    assert r.returncode == 0, r.stderr + r.stdout
    r = sshd.run(user, f"{KVMGATE} status {vm_name} --json")
    assert '"state": "running"' in r.stdout

    r = sshd.run(user, f"{KVMGATE} stop {vm_name} --timeout 60")
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert hashlib.sha256(Path(pw.pw_dir, "disk.img").read_bytes()).hexdigest() == disk_hash
