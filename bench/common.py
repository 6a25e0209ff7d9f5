"""Shared bench helpers: a bench user and VM on the standard installation."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

KVMGATE = "/usr/local/bin/kvmgate"
GUEST = Path("/var/cache/kvmgate-test-guest")
USER = "kgbench"
BOOT = ["-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initrd.img", "-append", "console=ttyS0 quiet"]
GUEST_BOOT_LINE = r"KVMGATE-GUEST-READY[^\r\n]*[\r\n]"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def setup() -> None:
    """Install kvmgate and the guest the way the demo does, and a bench user."""
    sh("sh", str(REPO / "guest/build-test-guest.sh"))
    sh(str(REPO / "install.sh"))
    sh(KVMGATE, "admin", "init", "--accel", "tcg")
    if sh("id", USER, check=False).returncode:
        sh("useradd", "--create-home", USER)


def define(name: str, *opts: str) -> None:
    sh(KVMGATE, "stop", name, "--owner", USER, "--force", check=False)
    sh(KVMGATE, "admin", "delete", name, "--owner", USER, check=False)
    sh(KVMGATE, "admin", "create", name, "--owner", USER, "--", *opts)


def report(title: str, base: list[float], ours: list[float], unit: str = "ms") -> str:
    mb, mo = statistics.median(base), statistics.median(ours)
    lines = [
        f"## {title}",
        f"baseline median {mb:.1f} {unit} (n={len(base)}), kvmgate median {mo:.1f} {unit} (n={len(ours)})",
        f"ratio {mo / mb:.2f}x, overhead {mo - mb:+.1f} {unit}",
    ]
    return "\n".join(lines)


QEMU = ["/usr/bin/qemu-system-x86_64"]  # the bare baseline's QEMU (and -L directories): select_qemu()
POLICY = Path("/etc/kvmgate/policy.toml")


def select_qemu(version: str) -> str:
    """Benchmark against `version`: "system" (the host's QEMU) or "10.0" (Debian 13's, fetched beside it by
    scripts/fetch-qemu10.sh). The bare baseline and kvmgate's policy both use it; the policy is put back
    at exit. Returns the QEMU's own version line."""
    import atexit

    if version != "system":
        if version != "10.0":
            raise SystemExit("--qemu: system or 10.0")
        binary = sh("sh", str(REPO / "scripts/fetch-qemu10.sh")).stdout.strip()
        root = binary.rsplit("/usr/bin/", 1)[0]
        data = [f"{root}/usr/share/qemu", f"{root}/usr/share/seabios", f"{root}/usr/lib/ipxe/qemu"]
        QEMU[:] = [binary, *(t for d in data for t in ("-L", d))]
        old = POLICY.read_text() if POLICY.exists() else ""
        keep = [line for line in old.splitlines() if not line.startswith(("qemu =", "qemu_data ="))]
        quoted = ", ".join(f'"{d}"' for d in data)
        POLICY.write_text(f'qemu = "{binary}"\nqemu_data = [{quoted}]\n' + "\n".join(keep) + "\n")
        atexit.register(POLICY.write_text, old)
    return sh(QEMU[0], "--version").stdout.splitlines()[0]


def bare_argv(sock: str, *extra: str, mem: str = "256") -> list[str]:
    """The bare QEMU command the benchmarks compare kvmgate with: the same VM, a QMP socket."""
    return [
        *QEMU,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        mem,
        "-display",
        "none",
        "-vga",
        "none",
        *BOOT,
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        *extra,
    ]
