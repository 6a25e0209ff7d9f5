"""QEMU's cgroup on a host booted with systemd: a transient scope
`kvmgate-<key>-<pid>.scope` under `kvmgate.slice`, with `Delegate=yes` and
`MemoryMax`, asked of systemd over D-Bus with busctl (as libvirt asks machined),
so kvmgate never writes into the tree systemd owns. Loaded only on such hosts
(host.cgroup chooses)."""

from __future__ import annotations

import subprocess
import time

from kvmgate.errors import KvmgateError

BUSCTL = "/usr/bin/busctl"
SLICE = "kvmgate.slice"


def scope_name(key: str, pid: int) -> str:
    """One scope per run: the last run's scope may not be collected yet."""
    return f"kvmgate-{key}-{pid}.scope"


def scope_argv(key: str, pid: int, limit_bytes: int) -> list[str]:
    """busctl's call of systemd's StartTransientUnit for QEMU's scope."""
    props = [
        ("PIDs", "au", "1", str(pid)),
        ("Slice", "s", SLICE),
        ("Delegate", "b", "true"),
        ("MemoryMax", "t", str(limit_bytes)),
        ("MemorySwapMax", "t", "0"),
        ("CollectMode", "s", "inactive-or-failed"),
    ]
    flat = [w for p in props for w in p]
    return [
        BUSCTL, "call", "--system", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        scope_name(key, pid), "fail", str(len(props)), *flat, "0",
    ]  # fmt: skip


def start(key: str, pid: int, limit_bytes: int, wait: float = 5.0) -> None:
    """systemd moves the pid when the job runs: wait until /proc says it is there."""
    try:
        subprocess.run(scope_argv(key, pid, limit_bytes), check=True, capture_output=True, timeout=wait)
    except subprocess.CalledProcessError as err:
        why = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise KvmgateError(f"systemd refused QEMU's scope: {why[0][:200]}") from None
    except subprocess.TimeoutExpired:
        raise KvmgateError("systemd did not answer for QEMU's scope in time") from None
    want = f"/{SLICE}/{scope_name(key, pid)}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/cgroup") as f:
            if any(line.rstrip().endswith(want) for line in f):
                return
        time.sleep(0.005)
    raise KvmgateError(f"systemd did not place QEMU in {scope_name(key, pid)}")
