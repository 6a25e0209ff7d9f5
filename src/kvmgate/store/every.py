"""Every VM: for listings and for loops over many VMs (autostart, logon,
reap, allocation checks), never for one VM's start or stop. Loops go on past a
VM that does not resolve (it is reported by `admin list`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from kvmgate.errors import KvmgateError
from kvmgate.model.settings import Settings
from kvmgate.paths import Paths
from kvmgate.store.registry import VM, read_settings, resolve


def list_names(paths: Paths, owner: str | None = None) -> list[tuple[str, str]]:
    owners = [owner] if owner else sorted(os.listdir(paths.names))
    out = []
    for o in owners:
        try:
            out += [(o, n) for n in sorted(os.listdir(os.path.join(paths.names, o)))]
        except FileNotFoundError:
            continue
    return out


def each_vm(paths: Paths, owner: str | None = None) -> Iterator[VM]:
    """Every VM (of `owner`) that resolves. One that does not is skipped: it is
    reported by `admin list`, and loops over many VMs must go on past it."""
    for o, n in list_names(paths, owner):
        try:
            vm = resolve(paths, o, n)
        except (KvmgateError, OSError, ValueError):
            continue
        yield vm


def all_settings(paths: Paths) -> list[tuple[VM, Settings]]:
    """Every VM with its settings: what allocations are checked against."""
    out = []
    for vm in each_vm(paths):
        try:
            out.append((vm, read_settings(vm)))
        except (KvmgateError, OSError, ValueError):
            continue
    return out
