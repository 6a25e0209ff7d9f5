"""Making room under a running-memory budget (`ops.budget` decides whether one
applies): which running VMs to hibernate, least recently used first, or the
refusal, before anything is hibernated. Imported only where a budget is set."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kvmgate.errors import KvmgateError, PolicyError
from kvmgate.host.caller import Caller
from kvmgate.model import selfservice as ss
from kvmgate.model.policy.policy import Policy
from kvmgate.paths import Paths
from kvmgate.store import config, live, registry, runtime

BUDGET_ACTOR = Caller(0, "memory-budget", False)


@contextlib.contextmanager
def held(paths: Paths, who: Caller, vm: registry.VM, policy: Policy) -> Iterator[None]:
    """The budgets that apply to this start: the host's (any caller) and the
    owner's grant (not for the admin). Their locks are held until the caller's
    start is done, so that the room made is the room used. The room itself is
    made by the start (`ops.lifecycle.ROOM`) once nothing can refuse it any
    more, with the memory it planned: a refused start hibernates nothing."""
    host = policy.running_memory_budget_mib
    own: int | None = None
    owner = vm.identity.owner
    from kvmgate.store import selfservice

    if not who.is_admin and selfservice.in_use(paths):
        grant = selfservice.grant_of(selfservice.load(paths, policy), owner)
        own = grant.running_memory_mib if grant else None
    if not host and own is None:
        yield
        return
    from kvmgate.ops.lifecycle import ROOM
    from kvmgate.store import locks

    wait = locks.WAIT if who.via_sudo else locks.INTERNAL_WAIT
    with contextlib.ExitStack() as stack:
        if host:
            stack.enter_context(selfservice.budget_lock(paths, wait))
        stack.enter_context(selfservice.owner_lock(paths, owner, wait))
        token = ROOM.set(lambda need: make_room(paths, who, vm, need, own, host))
        try:
            yield
        finally:
            ROOM.reset(token)


def last_used(vm: registry.VM) -> float:
    """When it was last used: its `used` mark (store.note.mark_used) or when this
    run began, whichever is later (0: unknown)."""
    times = [0.0]
    for name in ("used", "pid"):
        with contextlib.suppress(OSError):
            times.append(os.lstat(os.path.join(vm.rundir, name)).st_mtime)
    return max(times)


def make_room(paths: Paths, who: Caller, vm: registry.VM, need: int, own: int | None, host: int) -> None:
    """Hibernate what must go so that `need` MiB more fits both budgets, or refuse
    before hibernating anything."""
    policy = config.load(paths)
    name = vm.identity.name
    everyone = _running(paths, policy, None if host else vm.identity.owner, vm)
    plan: list[tuple[ss.Running, str]] = []
    if own is not None:
        mine = [r for r in everyone if r.owner == vm.identity.owner]
        pick = ss.victims(mine, need, own)
        if pick is None:
            used = sum(r.memory_mib for r in mine)
            raise PolicyError(
                "running memory",
                f"over your running-memory quota: your running VMs use {ss.show_mib(used)} of "
                f"{ss.show_mib(own)}, and {name} needs {ss.show_mib(need)}; none that may be hibernated "
                "to make room (on_pressure) frees enough: stop or hibernate one",
            )
        plan += [(r, f"to make room for your VM {name} (your running-memory quota of {ss.show_mib(own)})")
                 for r in pick]  # fmt: skip
    if host:
        chosen = {(r.owner, r.name) for r, _ in plan}
        rest = [r for r in everyone if (r.owner, r.name) not in chosen]
        pick = ss.victims(rest, need, host)
        if pick is None and not who.is_admin:
            used = sum(r.memory_mib for r in rest)
            raise PolicyError(
                "running memory",
                f"the host's running-memory budget is full: running VMs use {ss.show_mib(used)} of "
                f"{ss.show_mib(host)}, and {name} needs {ss.show_mib(need)}; try again later",
            )
        for r in pick or []:
            why = (
                f"to make room for your VM {name}" if r.owner == vm.identity.owner else "to make room for another VM"
            ) + f" (the host's running-memory budget of {ss.show_mib(host)})"
            plan.append((r, why))  # fmt: skip
    if plan:
        from kvmgate.host import audit
        from kvmgate.ops import power

        for r, why in plan:
            try:
                power.hibernate(paths, BUDGET_ACTOR, registry.resolve(paths, r.owner, r.name), why)
                audit.done(paths.audit_log, BUDGET_ACTOR, "made room", r.owner, r.name,
                           starting=f"{vm.identity.owner}/{name}", need_mib=need)  # fmt: skip
            except KvmgateError as err:  # gone, stopped or busy meanwhile: said to the audit log only
                audit.done(paths.audit_log, BUDGET_ACTOR, "could not hibernate to make room", r.owner, r.name,
                           why=str(err), starting=f"{vm.identity.owner}/{name}")  # fmt: skip
                raise PolicyError(
                    "running memory",
                    f"could not make room for {name}: a VM chosen to make room could not be "
                    "hibernated just now; try again",
                ) from None


def _running(paths: Paths, policy: Policy, owner: str | None, starting: registry.VM) -> list[ss.Running]:
    """Every running VM (of `owner`) but the one starting, as the budget sees it.
    One whose records cannot be read still counts, and is never chosen."""
    from kvmgate.ops.plan import plan_for
    from kvmgate.store import every
    from kvmgate.store.sessions import Sessions

    present: dict[str, tuple[bool, float]] = {}
    out = []
    for v in every.each_vm(paths, owner):
        if v.key == starting.key or not runtime.is_running(v):
            continue
        o = v.identity.owner
        if o not in present:
            s = Sessions(paths, o)
            try:
                when = os.lstat(s.dir).st_mtime  # the last logon or logoff changed it
            except OSError:
                when = 0.0
            present[o] = (s.live() > 0, when)
        try:
            plan = plan_for(v, policy, live.read_options(v), "tcg")
            allowed = registry.read_settings(v).on_pressure == "hibernate" and not plan.snapshot
        except KvmgateError:
            try:
                plan, allowed = plan_for(v, policy, [], "tcg"), False
            except KvmgateError:
                continue  # it cannot even be planned: it could not have been started by kvmgate as it is
        here, when = present[o]
        out.append(ss.Running(o, v.identity.name, plan.memory_mib, max(last_used(v), when), here, allowed))
    return out
