"""Running-memory budgets: an owner's (their grant's `running_memory`) and the
host's (the policy's `running_memory_budget_mib`). Every way a VM comes to run
(start here; the restore in a thaw, a wake: `ops.resume`) goes through `room` first.

When a start would pass a budget, the least recently used running VMs whose
settings allow it (`on_pressure = "hibernate"`) are hibernated first, and the
start goes ahead; if hibernating every such VM would not make enough room,
the start is refused and nothing is hibernated. "Used" is the VM's last start,
thaw, console attachment or connection through kvmgate-gated, or its owner's
last logon or logoff; a VM whose owner is logged on counts as used now.

Checking and reserving are one step: the host's budget lock (when there is a
host budget), then the owner's lock, are held from the check until the VM runs,
so two starts never both take the last room. Lock order: budget -> owner -> VM
(docs/architecture.md). A hibernated VM's owner sees why in `status` and
`kvmgate log`, and the audit log has it.

The owner's budget never refuses root (`kvmgate start --owner`); the host's
budget hibernates for root's starts too, but never refuses them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kvmgate.host.caller import Caller
from kvmgate.ops import lifecycle
from kvmgate.paths import Paths
from kvmgate.store import config, registry


def start(paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool = False) -> lifecycle.Started:
    with room(paths, who, vm):
        return lifecycle.start(paths, who, vm, options, paused)


@contextlib.contextmanager
def room(paths: Paths, who: Caller, vm: registry.VM) -> Iterator[None]:
    """Make room for `vm` under the budgets that apply, and hold them until the
    caller's start is done. Costs one stat when no budget is set."""
    policy = config.load(paths)
    if not policy.running_memory_budget_mib and not os.path.exists(os.path.join(paths.etc, "grants.toml")):
        yield
        return
    from kvmgate.ops import pressure  # only where a budget may be set

    with pressure.held(paths, who, vm, policy):
        yield
