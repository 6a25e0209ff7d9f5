"""RUN/<key>/note: why a running VM is as it is, when kvmgate chose for it (a
-snapshot VM paused at logoff instead of hibernated). `status` shows it; a thaw
clears it, and it goes with the run's other files (store.runtime.cleanup)."""

from __future__ import annotations

import contextlib
import os
import time

from kvmgate.store.files import read_small, write_atomic
from kvmgate.store.registry import VM


def write(vm: VM, note: str | None) -> None:
    """None clears it."""
    if note is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(vm.rundir, "note"))
    else:
        write_atomic(os.path.join(vm.rundir, "note"), note)


def read(vm: VM) -> str | None:
    try:
        return read_small(os.path.join(vm.rundir, "note"), 1024).decode(errors="replace")
    except FileNotFoundError:
        return None


def tell(vm: VM, text: str) -> None:
    """A line from kvmgate in the VM's console log (`kvmgate log`), between runs:
    nothing else writes it then (a restore's pump appends after it)."""
    line = f"\r\n[kvmgate {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {text}]\r\n".encode()
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(vm.sub("log", "console.log"), flags, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line[:1024])
    finally:
        os.close(fd)


def mark_used(vm: VM) -> None:
    """Its owner used it now (a thaw, a console, a connection through kvmgate-gated;
    a start is its run's beginning): the running-memory budget hibernates the least
    recently used (ops.pressure.last_used)."""
    with contextlib.suppress(OSError):
        path = os.path.join(vm.rundir, "used")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        os.utime(path, None, follow_symlinks=False)
