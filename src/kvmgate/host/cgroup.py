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

ROOT = "/sys/fs/cgroup"
GROUP = "kvmgate"
BUSCTL = "/usr/bin/busctl"  # host.scope calls it; a host without it keeps kvmgate's own group


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


class Placement:
    """Where a VM's QEMU goes; `place(pid)` is called before QEMU execs."""

    def __init__(self, key: str, limit_bytes: int, own: bool = True) -> None:
        self.key, self.limit = key, limit_bytes
        # A host booted with systemd but without busctl (a minimal container) keeps
        # kvmgate's own group: a start must never fail for want of a D-Bus client.
        self.scope = own and systemd_booted() and os.access(BUSCTL, os.X_OK)
        self.procs = None if self.scope or not own else _own_group(key, limit_bytes)

    def place(self, pid: int) -> None:
        if self.procs is not None:
            _write(self.procs, str(pid))
        elif self.scope:
            from kvmgate.host import scope  # systemd hosts only

            scope.start(self.key, pid, self.limit)


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
        # The group may be left from an earlier start with another limit, and v1 wants
        # limit <= memsw at every step: raise memsw first (fails harmlessly when
        # lowering), then the limit, then memsw (absent without swap accounting).
        for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            with contextlib.suppress(OSError) if "memsw" in name else contextlib.nullcontext():
                _write(os.path.join(path, name), str(limit_bytes))
        return os.path.join(path, "cgroup.procs")
    return None


def remove(key: str) -> None:
    """kvmgate's own groups; systemd collects a scope when its last process exits."""
    for base in (os.path.join(ROOT, GROUP), os.path.join(ROOT, "memory", GROUP)):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(base, key))
