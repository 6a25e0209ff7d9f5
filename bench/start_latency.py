"""Time from command to QEMU ready (QMP answering): bare QEMU vs `kvmgate start`.

Both start the same VM (the test guest's kernel, -m 256, TCG) paused (-S), so
only start-up is measured, not the guest's boot. The baseline is the QEMU
command kvmgate itself would run, launched directly by root with a QMP unix
socket; readiness is checked with the same QMP handshake in both cases.

    sudo .venv/bin/python bench/start_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

from common import BOOT, KVMGATE, USER, bare_argv, define, report, select_qemu, setup, sh
from kvmgate.host.qmp import wait_ready

VM = "benchstart"
OPTS = ["-m", "256", "-nographic", "-net", "none", *BOOT]


def bare_once(tmp: str) -> float:
    sock = os.path.join(tmp, "qmp.sock")
    argv = bare_argv(sock, "-S")
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(sock, time.monotonic() + 30, lambda: p.poll() is None)
    dt = time.perf_counter() - t0
    p.kill()
    p.wait()
    os.unlink(sock)
    return dt * 1000


def kvmgate_once(cmd: list[str], user: str | None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, user=user, group=user, extra_groups=[] if user else None)
    dt = time.perf_counter() - t0
    sh(KVMGATE, "stop", VM, "--owner", USER, "--force")
    return dt * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--as-user", action="store_true", help="run kvmgate as the bench user (front end, sudo, helper)")
    ap.add_argument("--qemu", default="system", help="system (the host's QEMU) or 10.0 (scripts/fetch-qemu10.sh)")
    args = ap.parse_args()
    setup()
    print(f"# {select_qemu(args.qemu)}")
    define(VM, *OPTS)
    # --as-user: the process runs with the user's uid, gid and groups, as from their shell.
    user = USER if args.as_user else None
    cmd = [KVMGATE, "start", VM, "--paused"] if user else [KVMGATE, "start", VM, "--owner", USER, "--paused"]
    base, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bare_once(tmp)
        kvmgate_once(cmd, user)  # warm caches for both
        for _ in range(args.runs):
            base.append(bare_once(tmp))
            ours.append(kvmgate_once(cmd, user))
    who = "as the VM's owner through sudo" if args.as_user else "as root"
    print(report(f"start to QMP ready: bare QEMU vs kvmgate start ({who})", base, ours))


if __name__ == "__main__":
    main()
