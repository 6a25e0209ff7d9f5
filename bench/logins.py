"""Logins under load: many users logging in over ssh at once, with kvmgate's PAM
hook and without it, in the same run.

    sudo .venv/bin/python bench/logins.py [--users 50] [--rounds 3]

Each of N bench users (each with one stopped VM whose logoff policy is `pause`,
so that every first logon and last logoff really hands work to kvmgate) logs in at
the same moment with `ssh -T user@127.0.0.1 true` (key authentication, sshd on
loopback with UsePAM, Debian's sshd stack). Measured: each login's wall time from
starting ssh to its exit. Rounds alternate: the hook installed (`admin init --pam`),
then removed (`--no-pam`): the baseline is the same logins without it, in the
same run. Between rounds, every kvmgate worker has finished.

Where logind runs, kvmgate installs no hook at all (kvmgate-sessions.service takes
logons from logind), so the login path costs nothing there; this measures the
fallback, the hook, on a host without logind.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import KVMGATE, setup, sh

PREFIX = "kglogin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sshd(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey"))
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n"
        "AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM yes\nPrintMotd no\nMaxStartups 200\nMaxSessions 200\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return p, port
        time.sleep(0.05)
    raise SystemExit("sshd did not come up")


def make_users(n: int, key: Path) -> list[str]:
    names = [f"{PREFIX}{i:02d}" for i in range(n)]
    for u in names:
        if sh("id", u, check=False).returncode:
            sh("useradd", "--create-home", "--shell", "/bin/sh", u)
        pw = pwd.getpwnam(u)
        ssh = Path(pw.pw_dir, ".ssh")
        ssh.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(key, ssh / "authorized_keys")
        for p in (ssh, ssh / "authorized_keys"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        sh(KVMGATE, "admin", "delete", "vm", "--owner", u, "--force", check=False)
        sh(KVMGATE, "admin", "create", "vm", "--owner", u, "--on-logoff", "pause", "--logoff-delay", "0",
           "--", "-m", "64")  # fmt: skip
    return names


def burst(users: list[str], port: int, key: Path) -> list[float]:
    """All users log in at once; each login's wall time in ms."""
    argv = ["ssh", "-T", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]  # fmt: skip
    procs = [(time.perf_counter(), subprocess.Popen([*argv, f"{u}@127.0.0.1", "true"], stdin=subprocess.DEVNULL))
             for u in users]  # fmt: skip
    out = []
    for t0, p in procs:
        assert p.wait(120) == 0, "a login failed"
        out.append((time.perf_counter() - t0) * 1000)
    return out


def quiet() -> None:
    """Wait until no kvmgate worker runs, and a little more."""
    for _ in range(600):
        r = subprocess.run(["pgrep", "-f", "kvmgate-pam|kvmgate-helper"], capture_output=True)
        if r.returncode:
            break
        time.sleep(0.1)
    time.sleep(1)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    setup()
    had_hook = "kvmgate-pam" in Path("/etc/pam.d/sshd").read_text()
    d = Path(tempfile.mkdtemp(prefix="kglogins-"))
    d.chmod(0o700)
    sshd = None
    try:
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "userkey"))
        users = make_users(args.users, d / "userkey.pub")
        sshd, port = start_sshd(d)
        burst(users[:2], port, d / "userkey")  # warm up
        times: dict[str, list[float]] = {"hook": [], "none": []}
        for r in range(args.rounds):
            for mode in ("hook", "none") if r % 2 == 0 else ("none", "hook"):
                sh(KVMGATE, "admin", "init", "--pam" if mode == "hook" else "--no-pam")
                quiet()
                got = burst(users, port, d / "userkey")
                times[mode] += got
                print(f"  {mode:<4} p50 {pct(got, 50):6.0f} ms  p99 {pct(got, 99):6.0f} ms", flush=True)
                quiet()
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        h, n = times["hook"], times["none"]
        print(f"## {args.users} users logging in at once over ssh, {args.rounds} rounds ({len(h)} logins per mode)")
        for p in (50, 90, 99):
            print(f"p{p}: without the hook {pct(n, p):7.0f} ms, with it {pct(h, p):7.0f} ms, "
                  f"overhead {pct(h, p) - pct(n, p):+6.0f} ms")  # fmt: skip
        print(f"mean: without {statistics.mean(n):.0f} ms, with {statistics.mean(h):.0f} ms")
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait()
        sh(KVMGATE, "admin", "init", "--pam" if had_hook else "--no-pam", check=False)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
