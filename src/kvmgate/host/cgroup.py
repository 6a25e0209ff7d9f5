"""Each QEMU in a memory-limited cgroup, the way the host's service manager expects.

Backends, chosen per host:
- systemd (the host booted with systemd): a transient scope `kvmgate-<key>.scope`
  under `kvmgate.slice`, with `Delegate=yes` and `MemoryMax`, asked of systemd over
  D-Bus (`busctl`, as libvirt asks machined): kvmgate never writes into the tree
  systemd owns;
- own (no systemd): kvmgate's own `kvmgate/<key>` group, cgroup v2 where the
  hierarchy has the memory controller, v1 otherwise;
- none: no memory controller at all (said in `admin init`).
The Slurm backend uses none: QEMU stays in the job's cgroup.

The limit is the admin's -m plus a documented overhead for QEMU itself, so a
guest (or a compromised QEMU) cannot take more of the host than it was given.
"""

from __future__ import annotations

import contextlib
import os
import time

from kvmgate.errors import KvmgateError

ROOT = "/sys/fs/cgroup"
GROUP = "kvmgate"
SLICE = "kvmgate.slice"
BUSCTL = "/usr/bin/busctl"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def systemd_booted() -> bool:
    """sd_booted(3): systemd is PID 1 exactly when this directory exists."""
    return os.path.isdir("/run/systemd/system")


def _v2_root() -> str | None:
    try:
        with open(os.path.join(ROOT, "cgroup.controllers")) as f:
            return ROOT if "memory" in f.read().split() else None
    except OSError:
        return None


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


class Placement:
    """Where a VM's QEMU goes; `place(pid)` is called before QEMU execs."""

    def __init__(self, key: str, limit_bytes: int) -> None:
        self.key, self.limit = key, limit_bytes
        # A host booted with systemd but without busctl (a minimal container) keeps
        # kvmgate's own group: a start must never fail for want of a D-Bus client.
        self.scope = systemd_booted() and os.access(BUSCTL, os.X_OK)
        self.procs = None if self.scope else _own_group(key, limit_bytes)

    def place(self, pid: int) -> None:
        if self.procs is not None:
            _write(self.procs, str(pid))
        elif self.scope:
            _start_scope(self.key, pid, self.limit)


def _start_scope(key: str, pid: int, limit_bytes: int, wait: float = 5.0) -> None:
    """systemd moves the pid when the job runs: wait until /proc says it is there."""
    import subprocess  # systemd hosts only: not on the start path elsewhere

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


def _own_group(key: str, limit_bytes: int) -> str | None:
    """kvmgate's own group; returns its cgroup.procs path (None: no memory controller)."""
    v2 = _v2_root()
    if v2:
        parent = os.path.join(v2, GROUP)
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(OSError):
            _write(os.path.join(v2, "cgroup.subtree_control"), "+memory")
        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        path = os.path.join(parent, key)
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, "memory.max"), str(limit_bytes))
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "memory.swap.max"), "0")
        return os.path.join(path, "cgroup.procs")
    v1 = os.path.join(ROOT, "memory")
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
        path = os.path.join(v1, GROUP, key)
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, "memory.limit_in_bytes"), str(limit_bytes))
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limit_bytes))
        return os.path.join(path, "cgroup.procs")
    return None


def remove(key: str) -> None:
    """kvmgate's own groups; systemd collects a scope when its last process exits."""
    for base in (os.path.join(ROOT, GROUP), os.path.join(ROOT, "memory", GROUP)):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(base, key))
