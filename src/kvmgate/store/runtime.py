"""A VM's runtime state under RUN/<key>/ (root 0700): liveness, QEMU's pid, the
user options it runs with, and kvmgate's own intent (the display record:
store.display).

QEMU itself holds RUN/<key>/lock (flock) for its whole life: that lock is the
liveness signal, and the only one (a pid file can be stale, a lock cannot).
It is separate from the VM's operation lock (`store.locks`), which serialises
kvmgate's own actors.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

from kvmgate.errors import KvmgateError, WrongState
from kvmgate.store.files import read_small, taken, touch, write_atomic
from kvmgate.store.registry import VM, mkdir_root

# Every file a start creates in RUN/<key>/; a stop, hibernate or crash clean-up removes them.
RUNTIME_FILES = (
    "qmp.sock",
    "console.sock",
    "pid",
    "options.json",
    "display.json",
    "vnc.password",
    "vnc.port",
    "note",
)


def is_running(vm: VM) -> bool:
    """QEMU holds its liveness lock for its whole life (exclusively)."""
    return taken(os.path.join(vm.rundir, "lock"), shared=True)


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


def liveness_lock(vm: VM) -> int:
    """Take the liveness lock for a QEMU about to start, or raise WrongState."""
    mkdir_root(vm.rundir, 0o700)
    fd = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WrongState(f"{vm.identity.name} is already running") from None
    return fd


def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


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


def write_pid(vm: VM, pid: int) -> None:
    write_atomic(os.path.join(vm.rundir, "pid"), f"{pid} {process_start(pid)}\n")


def write_options(vm: VM, options: list[str]) -> None:
    """The user options of the running QEMU: a hibernate records them, so the
    restored VM gets exactly the same devices."""
    write_atomic(os.path.join(vm.rundir, "options.json"), json.dumps(options))


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


def take_intended_exit(vm: VM) -> bool:
    try:
        os.unlink(os.path.join(vm.rundir, "intended-exit"))
        return True
    except FileNotFoundError:
        return False


def cleanup(vm: VM) -> None:
    for name in RUNTIME_FILES:
        try:
            os.unlink(os.path.join(vm.rundir, name))
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
