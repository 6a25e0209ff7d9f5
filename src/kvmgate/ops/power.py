"""Stop, freeze, thaw, hibernate, wake, and the logoff policy, for one VM, under
its operation lock (see `ops.lifecycle`)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import NamedTuple

from kvmgate.errors import KvmgateError, QMPError, WrongState
from kvmgate.host import audit, cgroup, migrate
from kvmgate.host.caller import Caller
from kvmgate.model.policy.policy import Policy
from kvmgate.ops.lifecycle import Started, lock, qmp, start_locked
from kvmgate.ops.plan import owner_dir, plan_for
from kvmgate.paths import Paths
from kvmgate.store import config, live, note, registry, runs, runtime
from kvmgate.store.trees import remove_tree

# ------------------------------------------------------------------------------ stop


class Stopped(NamedTuple):
    how: str
    forced: bool  # had to kill after the timeout


def stop(paths: Paths, who: Caller, vm: registry.VM, force: bool = False, timeout: float | None = None) -> Stopped:
    """Ask QEMU to end (ACPI power-down, or quit with force) under the VM's lock;
    wait for it without the lock, so the grace time (up to an hour) holds up no
    other actor; then, under the lock again, kill what is still the same QEMU."""
    with lock(paths, who, vm):
        if not runtime.is_running(vm):
            if registry.read_saved(vm) is not None:
                name = vm.identity.name
                raise WrongState(
                    f"{name} is hibernated, not running: `kvmgate start {name}` restores it, "
                    f"`kvmgate stop {name} --discard` throws its saved state away"
                )
            raise WrongState(f"{vm.identity.name} is not running")
        pid = live.read_pid(vm)
        grace = float(config.load(paths).stop_timeout) if timeout is None else timeout
        how = "killed"
        live.mark_intended_exit(vm)
        try:
            with qmp(vm, timeout=5) as q:
                q.execute("quit" if force else "system_powerdown")
                how = "quit" if force else "powered down"
        except (OSError, QMPError):
            pass
    try:
        stopped = live.wait_stopped(vm, 5 if how == "quit" else grace)
    except KeyboardInterrupt:
        # Interrupted while waiting (nothing held): a guest that ignores the power-down
        # keeps running, and its next exit must not pass for one kvmgate asked for.
        with lock(paths, who, vm):
            if runtime.is_running(vm) and live.read_pid(vm) == pid:
                runtime.take_intended_exit(vm)
        raise
    with lock(paths, who, vm):
        forced = False
        if not stopped and runtime.is_running(vm) and live.read_pid(vm) == pid:
            _kill_locked(vm, pid)
            how, forced = "killed after timeout", True
        if live.read_pid(vm) in (pid, None) and not runtime.is_running(vm):
            clean_up_run(vm)  # not a new run's files, if someone started it again meanwhile
            runs.end(vm, how)
        audit.done(paths.audit_log, who, "stop", vm.identity.owner, vm.identity.name, how=how)
        return Stopped(how, forced)


def _kill_locked(vm: registry.VM, pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not live.wait_stopped(vm, 10):
        raise KvmgateError(f"{vm.identity.name} did not stop")


def clean_up_run(vm: registry.VM) -> None:
    runtime.cleanup(vm)
    remove_tree(owner_dir(vm))
    cgroup.remove(vm.key)


def end_locked(paths: Paths, who: Caller, vm: registry.VM) -> None:
    """End a running VM at once (QMP quit, then SIGKILL), for a caller that already
    holds the VM's lock (`admin delete --force`)."""
    pid = live.read_pid(vm)
    live.mark_intended_exit(vm)
    with contextlib.suppress(OSError, QMPError), qmp(vm, timeout=5) as q:
        q.execute("quit")
    if not live.wait_stopped(vm, 5):
        _kill_locked(vm, pid)
    clean_up_run(vm)
    audit.done(paths.audit_log, who, "stop", vm.identity.owner, vm.identity.name, how="quit (delete --force)")


def discard(paths: Paths, who: Caller, vm: registry.VM) -> int:
    """`stop --discard`: throw a hibernated VM's saved state away, so that its next
    start is a fresh boot (its disks are as the guest left them when it was saved).
    Returns the bytes freed."""
    with lock(paths, who, vm):
        if runtime.is_running(vm):
            raise WrongState(f"{vm.identity.name} is running: stop it (it has no saved state while it runs)")
        saved = registry.read_saved(vm)
        if saved is None:
            raise WrongState(f"{vm.identity.name} is not hibernated: there is no saved state to discard")
        migrate.discard(vm)
        from kvmgate.host import holds

        holds.release(paths, vm)
        audit.done(paths.audit_log, who, "discard", vm.identity.owner, vm.identity.name, size=saved.size)
        return saved.size


# ------------------------------------------------------------- freeze, thaw, hibernate


def freeze(paths: Paths, who: Caller, vm: registry.VM) -> bool:
    """Pause the vCPUs. False if they were paused already."""
    with lock(paths, who, vm):
        return _vcpus(paths, who, vm, run=False)


def thaw(
    paths: Paths, who: Caller, vm: registry.VM, wanted: Callable[[], bool] | None = None
) -> tuple[bool, Started | None]:
    """Resume the vCPUs, or restore a hibernated VM. (changed, restored-as).
    `wanted` is asked again under the lock (an internal actor's reason to act)."""
    if (elsewhere := _on_its_node(paths, vm, "thaw", wanted)) is not None:
        return elsewhere == 0, None
    with lock(paths, who, vm):
        if wanted is not None and not wanted():
            return False, None
        if not runtime.is_running(vm):
            if registry.read_saved(vm) is None:
                raise WrongState(f"{vm.identity.name} is not running")
            return True, start_locked(paths, who, vm, [])
        return _vcpus(paths, who, vm, run=True), None


def wake(paths: Paths, who: Caller, vm: registry.VM) -> None:
    """Whatever state the VM is in, make it run: thaw, restore or start (gated)."""
    if _on_its_node(paths, vm, "thaw") is not None:
        return
    with lock(paths, who, vm):
        if runtime.is_running(vm):
            _vcpus(paths, who, vm, run=True)
        else:
            start_locked(paths, who, vm, [])


def reset(paths: Paths, who: Caller, vm: registry.VM) -> None:
    """A hard reset (QMP system_reset): the guest reboots without shutting down."""
    with lock(paths, who, vm):
        if not runtime.is_running(vm):
            raise WrongState(f"{vm.identity.name} is not running")
        try:
            with qmp(vm) as q:
                q.execute("system_reset")
        except (OSError, QMPError) as err:
            raise KvmgateError(f"{vm.identity.name}: the monitor refused: {err}") from None
        audit.done(paths.audit_log, who, "reset", vm.identity.owner, vm.identity.name)


def _on_its_node(paths: Paths, vm: registry.VM, verb: str, wanted: Callable[[], bool] | None = None) -> int | None:
    """The Slurm backend, a VM that runs on another node: the verb done there, as
    its owner (ops.cluster.relay), for kvmgate's own actors (the logoff policy,
    gated's wake). Its exit code; None: the VM is not elsewhere, act here."""
    policy = config.load(paths)
    if not policy.backend.slurm:
        return None
    from kvmgate.ops import cluster

    rec = cluster.running_elsewhere(paths, policy, vm)
    if rec is None:
        return None
    if wanted is not None and not wanted():
        return 1
    code, _, _ = cluster.relay(paths, policy, vm, rec, [verb, vm.identity.name], capture=True)
    if verb == "hibernate" and code == 0:
        cluster.wait_ended(policy, vm, rec.job)
    return code


def _vcpus(paths: Paths, who: Caller, vm: registry.VM, run: bool) -> bool:
    if not runtime.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    try:
        with qmp(vm) as q:
            status = q.execute("query-status").get("status")
            if (status == "running") == run:
                return False
            q.execute("cont" if run else "stop")
        if run:
            note.write(vm, None)
            note.mark_used(vm)
            _set_clock(vm)
    except (OSError, QMPError) as err:
        raise KvmgateError(f"{vm.identity.name}: the monitor refused: {err}") from None
    audit.done(paths.audit_log, who, "thaw" if run else "freeze", vm.identity.owner, vm.identity.name)
    return True


def _set_clock(vm: registry.VM) -> None:
    """After a thaw or a restore the guest's clock is behind by the time it stood
    still: its guest agent, where the admin gave it one, sets it from the host's."""
    if os.path.exists(os.path.join(vm.rundir, "qga.sock")):
        from kvmgate.host import agent

        agent.set_time(vm.rundir)


def runs_with_snapshot(policy: Policy, vm: registry.VM, options: list[str]) -> bool:
    """-snapshot from the admin's options or the user's: its overlay ends with
    QEMU, so such a VM can never be hibernated."""
    return plan_for(vm, policy, options, "tcg").snapshot


def hibernate(paths: Paths, who: Caller, vm: registry.VM, why: str | None = None) -> registry.Saved:
    with lock(paths, who, vm):
        return hibernate_locked(paths, who, vm, why)


def hibernate_locked(paths: Paths, who: Caller, vm: registry.VM, why: str | None = None) -> registry.Saved:
    """Save the VM and end QEMU. `why`: kvmgate chose to (the memory budget), said
    in the audit record, in how the run ended (`status`) and in its console log."""
    name = vm.identity.name
    if not runtime.is_running(vm):
        raise WrongState(f"{name} is not running")
    options = live.read_options(vm)
    if runs_with_snapshot(config.load(paths), vm, options):
        raise WrongState(f"{name} runs with -snapshot: its overlay ends with QEMU, so it cannot hibernate")
    from kvmgate.host import holds

    pid = live.read_pid(vm)
    holds.hold(paths, vm, pid or 0)
    live.mark_intended_exit(vm)
    try:  # the state is root's file, not the owner's disk: a disk quota's file size limit must not cut it
        saved = migrate.save(vm, options, through_pipe=_file_size_limited(pid))
    except BaseException:
        holds.release(paths, vm)  # still running (or paused): nothing is held
        runtime.take_intended_exit(vm)
        raise
    if not live.wait_stopped(vm, 30):
        raise KvmgateError(f"{name} was saved but QEMU did not exit")
    clean_up_run(vm)
    runs.end(vm, f"hibernated {why}" if why else "hibernated")
    if why:
        note.tell(vm, f"hibernated {why}")
    audit.done(paths.audit_log, who, "hibernate", vm.identity.owner, name, size=saved.size, checksum=saved.checksum,
               **({"why": why} if why else {}))  # fmt: skip
    return saved


def _file_size_limited(pid: int | None) -> bool:
    """Does QEMU run under RLIMIT_FSIZE (a disk quota's bound, ops.quota)? Read
    from /proc: raising another process's limit needs CAP_SYS_RESOURCE, which root
    in some containers lacks, so the save goes through a pipe instead."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            return any(line.startswith("Max file size") and line.split()[3] != "unlimited" for line in f)
    except (OSError, IndexError, TypeError):
        return True  # unknown: the pipe works either way


def sleep(
    paths: Paths, who: Caller, vm: registry.VM, mode: str, wanted: Callable[[], bool] | None = None
) -> str | None:
    """The logoff policy: freeze (`pause`) or hibernate a running VM; nothing for
    `none`, a VM that is not running, or when `wanted()`, asked under the lock,
    says the reason to act is gone (the owner logged on again)."""
    if mode != "none":
        verb = "hibernate" if mode == "hibernate" else "freeze"
        if (elsewhere := _on_its_node(paths, vm, verb, wanted)) is not None:
            if elsewhere == 0 and wanted is not None and not wanted():
                # The owner came back while the verb ran on the node, away from this lock (a thaw
                # then found nothing to do): undone, so that no logged-on owner's VM stays asleep.
                thaw(paths, who, vm)
                return None
            return None if elsewhere else ("hibernated" if mode == "hibernate" else "froze")
    with lock(paths, who, vm):
        if mode == "none" or not runtime.is_running(vm) or (wanted is not None and not wanted()):
            return None
        if mode == "hibernate" and runs_with_snapshot(config.load(paths), vm, live.read_options(vm)):
            # Its overlay ends with QEMU: it cannot hibernate, so it is paused, and status says why.
            note.write(vm, "paused at logoff, not hibernated: it runs with -snapshot")
            mode = "pause"
        if mode == "pause":
            return "froze" if _vcpus(paths, who, vm, run=False) else None
        hibernate_locked(paths, who, vm)
        return "hibernated"
