"""`admin shutdown` and `admin boot`: the host going down and coming back, like
libvirt-guests with ON_SHUTDOWN=suspend (run by kvmgate-guests.service).

At shutdown every running VM that is not a service VM (services are the
watchers' and autostart's) is hibernated, paused ones too: the saved state
records whether its vCPUs ran. A VM that cannot hibernate (-snapshot) is powered
down over ACPI instead, and the record says which. The VMs are handled in
parallel, a few at a time, each in its own process, within one total deadline;
a VM still running past it is killed, and that is recorded too. The VMs
hibernated here are listed in STATE/host-shutdown.json; `admin boot` restores
each of them into the state it was in (paused or running), again in parallel,
and empties the list.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from kvmgate.errors import UsageError, one_line
from kvmgate.host import audit
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.model.settings import parse_seconds
from kvmgate.ops import budget, lifecycle, power
from kvmgate.paths import Paths
from kvmgate.store import config, critical, every, live, registry, runtime
from kvmgate.store.files import read_small, write_atomic

PARALLEL = 4  # VMs saved or restored at once (each is mostly disk bandwidth)
DEFAULT_TIMEOUT = 300


def run(req: Request, who: Caller, paths: Paths) -> int:
    t = req.flag("--timeout")
    deadline = time.monotonic() + (DEFAULT_TIMEOUT if t is None else parse_seconds(t, "--timeout", limit=3600))
    owner = req.flag("--owner")
    if req.verb == "admin-shutdown":
        return shutdown(paths, who, deadline, owner)
    if req.verb == "admin-boot":
        return boot(paths, who, deadline, owner)
    raise UsageError(f"unknown verb {req.verb}")


def _list_file(paths: Paths) -> str:
    return os.path.join(paths.state, "host-shutdown.json")


def shutdown(paths: Paths, who: Caller, deadline: float, owner: str | None = None) -> int:
    vms = [
        vm for vm in every.each_vm(paths, owner) if runtime.is_running(vm) and not registry.read_settings(vm).service
    ]
    policy = config.load(paths)

    def save(vm: registry.VM) -> str:
        if power.runs_with_snapshot(policy, vm, live.read_options(vm)):
            left = max(1.0, deadline - time.monotonic() - 5)
            stopped = power.stop(paths, who, vm, timeout=min(float(policy.stop_timeout), left))
            return f"powered down at host shutdown ({stopped.how}): it runs with -snapshot, which cannot hibernate"
        power.hibernate(paths, who, vm)
        return "hibernated"

    outcomes = _in_parallel(vms, save, deadline)
    saved = [f"{vm.identity.owner}:{vm.identity.name}" for vm, how in outcomes if how == "hibernated"]
    previous = _read_list(paths)
    write_atomic(_list_file(paths), json.dumps(sorted(set(previous) | set(saved))), fsync=True)
    failed = 0
    for vm, how in outcomes:
        if how.startswith("error: ") and runtime.is_running(vm):  # past the deadline, or refused: end it
            try:
                power.stop(paths, who, vm, force=True)
                how += "; killed at host shutdown"
            except Exception as err:  # noqa: BLE001 - one VM never stops the others
                how += f"; could not be stopped: {one_line(err)}"
            failed += 1
        print(f"{vm.identity.owner}/{vm.identity.name}: {how}")
        outcome = "error" if how.startswith("error") else "ok"
        audit.record(paths.audit_log, caller=who.name, uid=who.uid, verb="admin shutdown", vm=vm.identity.name,
                     owner=vm.identity.owner, outcome=outcome, how=how)  # fmt: skip
    return 1 if failed else 0


def boot(paths: Paths, who: Caller, deadline: float, only: str | None = None) -> int:
    wanted = _read_list(paths)
    vms = []
    for entry in wanted:
        owner, _, name = entry.partition(":")
        if only is not None and owner != only:
            continue
        try:
            vms.append(registry.resolve(paths, owner, name))
        except Exception as err:  # noqa: BLE001 - deleted since: nothing to restore
            print(f"{owner}/{name}: not restored: {one_line(err)}")

    def restore(vm: registry.VM) -> str:
        if registry.read_saved(vm) is None:
            return "not hibernated any more: left as it is"
        started = budget.start(paths, who, vm, [])
        return f"restored (pid {started.pid})"

    failed = 0
    for vm, how in _in_parallel(vms, restore, deadline):
        failed += how.startswith("error: ")
        print(f"{vm.identity.owner}/{vm.identity.name}: {how}")
    done = {f"{vm.identity.owner}:{vm.identity.name}" for vm in vms}
    left = [e for e in wanted if e not in done and (only is None or not e.startswith(f"{only}:"))]
    write_atomic(_list_file(paths), json.dumps(left), fsync=True)
    return 1 if failed else 0


def _read_list(paths: Paths) -> list[str]:
    try:
        data = json.loads(read_small(_list_file(paths)))
    except (OSError, ValueError):
        return []
    return [str(e) for e in data] if isinstance(data, list) else []


def _in_parallel(
    vms: list[registry.VM], work: Callable[[registry.VM], str], deadline: float
) -> list[tuple[registry.VM, str]]:
    """work(vm) for each VM, PARALLEL at a time, each in a child process that
    reports one line through a pipe; past the deadline, children are killed and
    their VMs reported as not done."""
    results: dict[int, str] = {}
    running: dict[int, tuple[int, int]] = {}  # pid -> (index, read end)
    queue = list(range(len(vms)))
    while queue or running:
        critical.checkpoint()
        while queue and len(running) < PARALLEL:
            i = queue.pop(0)
            r, w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    line = work(vms[i])
                except BaseException as err:  # noqa: BLE001 - reported by the parent
                    line = f"error: {one_line(err)}"
                os.write(w, line.encode()[:4000])
                os._exit(0)
            os.close(w)
            running[pid] = (i, r)
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid in running:
            i, r = running.pop(pid)
            results[i] = os.read(r, 4096).decode(errors="replace") or "error: no answer"
            os.close(r)
        elif time.monotonic() > deadline:
            for pid, (i, r) in running.items():
                lifecycle.kill_and_reap(pid)
                results[i] = "error: not done before the deadline"
                os.close(r)
            running.clear()
            for i in queue:
                results[i] = "error: not begun before the deadline"
            queue.clear()
        else:
            time.sleep(0.05)
    return [(vms[i], results[i]) for i in range(len(vms))]
