"""Thaw and wake within the running-memory budgets: a thaw of a hibernated VM
and a wake of a stopped or hibernated one make it run, so they make room first
(`ops.budget.room`), like a start. Apart from `ops.power` so that the budget's
own hibernations (`ops.pressure`) can use it without a cycle."""

from __future__ import annotations

from collections.abc import Callable

from kvmgate.host.caller import Caller
from kvmgate.ops import budget, power
from kvmgate.ops.lifecycle import Started
from kvmgate.paths import Paths
from kvmgate.store import registry


def thaw(
    paths: Paths, who: Caller, vm: registry.VM, wanted: Callable[[], bool] | None = None
) -> tuple[bool, Started | None]:
    with budget.room(paths, who, vm):
        return power.thaw(paths, who, vm, wanted)


def wake(paths: Paths, who: Caller, vm: registry.VM) -> None:
    with budget.room(paths, who, vm):
        power.wake(paths, who, vm)
