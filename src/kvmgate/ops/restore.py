"""The second half of starting a hibernated VM: its QEMU is up, waiting with
`-incoming defer -S`; load the state, give the disks back, record it.

Apart from ops.lifecycle so that a plain start never loads the migration code
(the root path of `start` is kept small: tests/unit/test_architecture.py).
"""

from __future__ import annotations

import sys

from kvmgate.errors import KvmgateError
from kvmgate.host import audit, holds, migrate, qemu_version
from kvmgate.host.caller import Caller
from kvmgate.paths import Paths
from kvmgate.store import registry


def load(paths: Paths, vm: registry.VM, saved: registry.Saved) -> None:
    """Load `saved` into the VM's waiting QEMU and run it; on failure the caller
    ends that QEMU (the state is kept, and the message says why, and the way out)."""
    try:
        migrate.restore(vm, saved)
    except KvmgateError as err:
        raise qemu_version.explain(err, paths, vm.identity.name, saved.qemu) from None


def resumed(paths: Paths, who: Caller, vm: registry.VM, saved: registry.Saved) -> None:
    """The VM runs its restored state: what follows must not end it (its state
    is being thrown away), so each step is on its own."""
    migrate.resumed(vm, saved)
    try:
        holds.release(paths, vm)  # its disks are its running QEMU's again
    except OSError as err:
        sys.stderr.write(f"kvmgate: warning: {vm.identity.name}'s disk holds were not released: {err.strerror}\n")
    audit.done(paths.audit_log, who, "restore", vm.identity.owner, vm.identity.name, size=saved.size)
