"""RUN/<key>/note: why a running VM is as it is, when kvmgate chose for it (a
-snapshot VM paused at logoff instead of hibernated). `status` shows it; a thaw
clears it, and it goes with the run's other files (store.runtime.cleanup)."""

from __future__ import annotations

import contextlib
import os

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
