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

from kvmgate.errors import WrongState
from kvmgate.store.files import taken, write_atomic
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
    "used",
)


def is_running(vm: VM) -> bool:
    """QEMU holds its liveness lock for its whole life (exclusively)."""
    return taken(os.path.join(vm.rundir, "lock"), shared=True)


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


def write_pid(vm: VM, pid: int) -> None:
    write_atomic(os.path.join(vm.rundir, "pid"), f"{pid} {process_start(pid)}\n")


def write_options(vm: VM, options: list[str]) -> None:
    """The user options of the running QEMU: a hibernate records them, so the
    restored VM gets exactly the same devices."""
    write_atomic(os.path.join(vm.rundir, "options.json"), json.dumps(options))


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
