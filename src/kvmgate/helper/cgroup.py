"""A per-VM memory cgroup: v2 where the host has controllers, v1 otherwise.

The limit is the admin's -m plus a documented overhead for QEMU itself, so a
guest (or a compromised QEMU) cannot take more of the host than it was given.
"""

from __future__ import annotations

import contextlib
import os

ROOT = "/sys/fs/cgroup"
GROUP = "kvmgate"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _v2_root() -> str | None:
    try:
        with open(os.path.join(ROOT, "cgroup.controllers")) as f:
            return ROOT if "memory" in f.read().split() else None
    except OSError:
        return None


def setup(key: str, limit_bytes: int) -> str | None:
    """Create the VM's cgroup and return its cgroup.procs path (None: no memory controller)."""
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
    for base in (os.path.join(ROOT, GROUP), os.path.join(ROOT, "memory", GROUP)):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(base, key))
