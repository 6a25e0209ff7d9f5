"""A/B of start latency between two commits of kvmgate, in one run.

Installs commit A (default: the commit before HEAD) and this tree (B) side by side
into their own prefixes, state, policy and sudoers drop-ins, defines the same VM
in each, and interleaves bare QEMU, A and B run by run, so that the machine's
drift hits all three alike. Prints each median against the bare QEMU baseline
and B against A.

    sudo .venv/bin/python bench/ab_start.py [--base REV] [--runs N] [--as-user]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import BOOT, REPO, USER, sh
from start_latency import bare_once

OPTS = ["-m", "256", "-nographic", "-net", "none", *BOOT]
VM = "benchab"


class Install:
    def __init__(self, tag: str, tree: Path) -> None:
        self.root = Path(f"/opt/kvmgate-ab-{tag}")
        self.bin = str(self.root / "bin/kvmgate")
        self.sudoers = f"/etc/sudoers.d/kvmgate-ab-{tag}"
        self.run = f"/run/kvmgate-ab-{tag}"
        shutil.rmtree(self.root, ignore_errors=True)
        etc = self.root / "etc"
        etc.mkdir(parents=True)
        (etc / "policy.toml").write_text(
            f'accel = "tcg"\n[host]\nifprefix = "k{tag}"\n[ports]\npool = [2{ord(tag) % 10}000, 2{ord(tag) % 10}099]\n'
            f'internal = [4{ord(tag) % 10}000, 4{ord(tag) % 10}099]\n[networks.user]\ntype = "user"\n'
        )
        where = ["--prefix", str(self.root), "--etc", str(etc), "--state", str(self.root / "state")]
        where += ["--run", self.run, "--log", str(self.root / "log"), "--sudoers", self.sudoers]
        sh(str(tree / "install.sh"), *where)
        sh(self.bin, "admin", "init", "--accel", "tcg")
        sh(self.bin, "admin", "create", VM, "--owner", USER, "--", *OPTS)

    def once(self, user: str | None) -> float:
        cmd = [self.bin, "start", VM, "--paused"] + ([] if user else ["--owner", USER])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, user=user, group=user, extra_groups=[] if user else None)
        dt = time.perf_counter() - t0
        sh(self.bin, "stop", VM, "--owner", USER, "--force")
        return dt * 1000

    def remove(self) -> None:
        sh(self.bin, "stop", VM, "--owner", USER, "--force", check=False)
        sh(self.bin, "admin", "net-down", check=False)
        Path(self.sudoers).unlink(missing_ok=True)
        shutil.rmtree(self.run, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="HEAD~1", help="commit A (default: the commit before HEAD)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--as-user", action="store_true", help="run kvmgate as the VM's owner (front end, sudo, helper)")
    args = ap.parse_args()
    sh("sh", str(REPO / "guest/build-test-guest.sh"))
    if sh("id", USER, check=False).returncode:
        sh("useradd", "--create-home", USER)
    base = sh("git", "-C", str(REPO), "rev-parse", args.base).stdout.strip()
    head = sh("git", "-C", str(REPO), "rev-parse", "HEAD").stdout.strip()
    user = USER if args.as_user else None
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp, "a")
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", base], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        a, b = Install("a", old), Install("b", REPO)
        try:
            times: dict[str, list[float]] = {"bare": [], "a": [], "b": []}
            bare_once(tmp), a.once(user), b.once(user)  # warm caches
            for _ in range(args.runs):
                times["bare"].append(bare_once(tmp))
                times["a"].append(a.once(user))
                times["b"].append(b.once(user))
        finally:
            a.remove()
            b.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    who = "as the VM's owner through sudo" if args.as_user else "as root"
    print(f"## start to QMP ready, A/B in one run ({who}, n={args.runs} each, interleaved)")
    print(f"A = {base[:12]}, B = {head[:12]} (working tree)")
    print(f"bare QEMU median {med['bare']:.1f} ms")
    for k in ("a", "b"):
        ratio, extra = med[k] / med["bare"], med[k] - med["bare"]
        print(f"{k.upper()} median {med[k]:.1f} ms: {ratio:.2f}x bare, overhead {extra:+.1f} ms")
    print(f"B/A {med['b'] / med['a']:.3f}x ({med['b'] - med['a']:+.1f} ms)")


if __name__ == "__main__":
    main()
