"""The display record of a VM's run, RUN/<key>/display.json: how its owner
reaches the screen (`kvmgate vnc`) and which TCP port the host's rules guard.
Loaded only by a start with a display, `kvmgate vnc` and the rules' sync.
Removed with the rest of the run's files (store.runtime.cleanup)."""

from __future__ import annotations

import json
import os
from typing import Any

from kvmgate.store.files import read_small, write_atomic
from kvmgate.store.registry import VM

DISPLAY_VERSION = 1


def write_display(vm: VM, record: dict[str, Any]) -> None:
    """How the owner reaches the display of this run (`kvmgate vnc`)."""
    data = {**record, "version": DISPLAY_VERSION}
    write_atomic(os.path.join(vm.rundir, "display.json"), json.dumps(data, sort_keys=True))


def read_display(vm: VM) -> dict[str, Any]:
    try:
        data = json.loads(read_small(os.path.join(vm.rundir, "display.json")))
    except FileNotFoundError:
        return _legacy_display(vm)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.pop("version", None) != DISPLAY_VERSION:
        return {}  # a format this release does not know: nothing to show, nothing to guard wrongly
    return data


def _legacy_display(vm: VM) -> dict[str, Any]:
    """VMs started before display.json (an upgrade with VMs running) kept their TCP
    VNC port and password in two files: read them, so the port stays guarded."""
    try:
        port = int(read_small(os.path.join(vm.rundir, "vnc.port"), 16))
        password = read_small(os.path.join(vm.rundir, "vnc.password"), 64).decode().strip()
    except (OSError, ValueError):
        return {}
    return {"vnc": {"kind": "tcp", "port": port, "password": password}}
