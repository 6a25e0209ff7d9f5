"""Service VMs: the design note's third logon path ("VM is running as a daemon,
providing some services to other VMs"). `admin autostart` and `admin watch`.

A service VM is owned by the dedicated system account `kvmgate-svc` (or a named
owner), is started at boot by `kvmgate admin autostart`, and is supervised by
`kvmgate-vm@OWNER:NAME.service`, whose main process is `kvmgate admin watch`:
it starts the VM if needed and waits for QEMU to exit; an exit kvmgate did not
ask for (a crash) is a failure (exit 7), so systemd restarts it. Users see
service VMs in `kvmgate list --services` and cannot control them.
"""

from __future__ import annotations

import os
import signal
import sys

from kvmgate.errors import Busy, UsageError, VMDied, WrongState, one_line
from kvmgate.host.caller import Caller
from kvmgate.model import identity as ident
from kvmgate.model.commands import Request
from kvmgate.ops import budget, power
from kvmgate.paths import Paths
from kvmgate.store import critical, every, live, registry, runtime


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "admin-autostart":
        return autostart(who, paths)
    if req.verb == "admin-watch":
        return watch(who, paths, req.name or "")
    raise UsageError(f"unknown verb {req.verb}")


def autostart(who: Caller, paths: Paths) -> int:
    """Start every service VM marked autostart. Where systemd runs, each is handed
    to its watcher unit (kvmgate-vm@OWNER:NAME), which starts it and restarts it
    if it dies; elsewhere it is started here. One VM's failure, whatever it is,
    is reported and never stops the loop for the VMs after it."""
    from kvmgate.host import schedule

    supervised = schedule.systemd_runs()
    failed = 0
    for vm in every.each_vm(paths):
        critical.checkpoint()  # a deferred SIGTERM stops the loop between VMs
        try:
            settings = registry.read_settings(vm)
            if settings.service and settings.autostart and not runtime.is_running(vm):
                if supervised:
                    schedule.start_watcher(vm.identity.owner, vm.identity.name)
                else:
                    budget.start(paths, who, vm, [])
        except Busy as err:  # another operation held it too long: that is a failure here
            failed += 1
            sys.stderr.write(f"kvmgate: autostart {vm.identity.owner}/{vm.identity.name}: {err}\n")
        except WrongState:
            continue  # started meanwhile by someone else
        except Exception as err:  # noqa: BLE001 - one owner's VM never stops the others'
            failed += 1
            sys.stderr.write(f"kvmgate: autostart {vm.identity.owner}/{vm.identity.name}: {one_line(err)}\n")
    return 1 if failed else 0


def watch(who: Caller, paths: Paths, target: str) -> int:
    """Start the VM if needed, then wait for QEMU: exit 0 if kvmgate ended it on
    purpose (stop, hibernate, or this watcher's SIGTERM), 7 if it died."""
    owner, sep, name = target.partition(":")
    if not sep:
        raise UsageError("admin watch takes OWNER:NAME (the kvmgate-vm@ unit's instance)")
    ident.check_owner(owner)
    vm = registry.resolve(paths, owner, ident.check_name(name))

    def on_term() -> None:
        try:
            power.stop(paths, who, vm)
        finally:
            os._exit(0)

    # A SIGTERM during the start (a restore may take minutes) waits until it is done,
    # as every relayed signal does while the VM's lock is held (store.critical);
    # then the watcher stops the VM under the same lock.
    critical.act_on(signal.SIGTERM, on_term)
    if not runtime.is_running(vm):
        try:
            budget.start(paths, who, vm, [])
        except Busy:
            raise
        except WrongState:
            pass  # running already: watch it
    if signal.SIGTERM in critical.deferred():
        on_term()
    sys.stdout.flush()
    live.wait_exit(vm)
    if runtime.take_intended_exit(vm) or registry.read_saved(vm) is not None:
        return 0
    runtime.cleanup(vm)
    raise VMDied(f"{owner}/{name}: QEMU exited unexpectedly")
