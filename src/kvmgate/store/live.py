"""Reading a running VM's runtime state, and waiting for QEMU to end: what stop,
hibernate, status and the watchers need, kept apart from `store.runtime`
(what a start writes) so that the start path stays small."""

from __future__ import annotations

import fcntl
import json
import os
import time

from kvmgate.errors import KvmgateError
from kvmgate.store.files import read_small, touch
from kvmgate.store.registry import VM
from kvmgate.store.runtime import is_running, process_start


def wait_stopped(vm: VM, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_running(vm):
            return True
        time.sleep(0.01)
    return not is_running(vm)


def wait_exit(vm: VM) -> None:
    """Block until QEMU (which holds the liveness lock for its whole life) exits."""
    fd = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def log_tail(vm: VM, lines: int = 3) -> list[str]:
    """The last lines QEMU logged (its refusal, its last words), from at most the last 4 KiB."""
    try:
        with open(vm.sub("log", "qemu.log"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            said = [ln.strip() for ln in f.read(4096).decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return [ln[:600] for ln in said[-lines:]]


def read_pid(vm: VM) -> int | None:
    """QEMU's pid, if the recorded process is still the one kvmgate started."""
    try:
        pid_s, start_s = read_small(os.path.join(vm.rundir, "pid"), 64).decode().split()
        pid = int(pid_s)
        if process_start(pid) == int(start_s):
            return pid
    except (OSError, ValueError):
        pass
    return None


def read_options(vm: VM) -> list[str]:
    try:
        data = json.loads(read_small(os.path.join(vm.rundir, "options.json")))
    except (OSError, ValueError):
        raise KvmgateError(f"{vm.identity.name}: no record of its options") from None
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise KvmgateError(f"{vm.identity.name}: corrupt options record")
    return data


def mark_intended_exit(vm: VM) -> None:
    """kvmgate is about to end QEMU on purpose: a watcher must not restart it."""
    touch(os.path.join(vm.rundir, "intended-exit"))
