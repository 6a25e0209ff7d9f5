"""How a VM's runs began and ended: `log/run.json` in the VM's own directory.

It lives on the state storage, not in RUN (gone at a reboot), so that `status`
can still say how the last run ended after the host went down. A start writes
when and in which boot the run began; kvmgate's own endings (powered down,
quit, killed after the timeout, hibernated) write how it ended. A run with no
recorded ending ended without kvmgate: in an earlier boot of the host, it was
killed when the host crashed or lost power; in this boot, QEMU exited by
itself (a crash, or the guest powered off), and QEMU's last log lines say more.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kvmgate.store.files import read_small, write_atomic
from kvmgate.store.registry import VM


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _path(vm: VM) -> str:
    return vm.sub("log", "run.json")


def read(vm: VM) -> dict[str, Any]:
    try:
        data = json.loads(read_small(_path(vm), 4096))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def begin(vm: VM, pid: int) -> None:
    record = {"started_at": time.time(), "boot_id": boot_id(), "pid": pid}
    write_atomic(_path(vm), json.dumps(record, sort_keys=True))


def end(vm: VM, how: str) -> None:
    record = read(vm)
    record["ended"] = {"at": time.time(), "how": how}
    write_atomic(_path(vm), json.dumps(record, sort_keys=True))
