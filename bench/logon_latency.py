"""Time a PAM logon (`su -l USER -c true`) adds when kvmgate's session hook is
installed, with the user's VM frozen by a pause policy (so every logon thaws it
and every logoff freezes it again). Baseline: the same command with the hook
removed, interleaved in the same run.

    sudo .venv/bin/python bench/logon_latency.py [--runs N]
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import BOOT, KVMGATE, USER, define, report, setup, sh

VM = "benchlogon"


def su_once() -> float:
    t0 = time.perf_counter()
    subprocess.run(["su", "-l", USER, "-c", "true"], check=True, capture_output=True)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    setup()
    define(VM, "-m", "256", "-nographic", "-net", "none", *BOOT)
    sh(KVMGATE, "admin", "set", VM, "--owner", USER, "--on-logoff", "pause")
    sh(KVMGATE, "start", VM, "--owner", USER)
    sh(KVMGATE, "freeze", VM, "--owner", USER)
    base, hooked = [], []
    try:
        for _ in range(args.runs):
            sh(KVMGATE, "admin", "init", "--no-pam")
            base.append(su_once())
            sh(KVMGATE, "admin", "init", "--pam")
            hooked.append(su_once())
            time.sleep(0.3)  # let the detached thaw and freeze finish before the next logon
    finally:
        sh(KVMGATE, "admin", "init", "--no-pam")
        sh(KVMGATE, "stop", VM, "--owner", USER, "--force", check=False)
    print(report("su -l: without vs with the kvmgate PAM hook (VM thawed at logon, frozen at logoff)", base, hooked))


if __name__ == "__main__":
    main()
