"""Service VMs: the design note's third logon path ("VM is running as a daemon,
providing some services to other VMs").

A service VM is owned by the dedicated system account `kvmgate-svc` (or a named
owner), is started at boot by `kvmgate admin autostart`, and is supervised by
`kvmgate-vm@OWNER:NAME.service`, whose main process is `kvmgate admin watch`:
it starts the VM if needed and waits for QEMU to exit; an exit kvmgate did not
ask for (a crash) is a failure, so systemd restarts it. Users see service VMs
in `kvmgate list --services` and cannot control them (they are not theirs).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from .. import identity as ident
from .. import registry
from ..errors import KvmgateError, UsageError
from ..paths import Paths
from . import hibernate
from .caller import Caller
from .main import Request

SERVICE_USER = "kvmgate-svc"


def ensure_service_user() -> str:
    from .admin import ensure_system_user

    ensure_system_user(SERVICE_USER)
    return SERVICE_USER


def _start(who: Caller, paths: Paths, vm: registry.VM) -> None:
    from .vmctl import start

    req = Request("start")
    req.name = vm.identity.name
    start(req, who, paths, vm)


def autostart(who: Caller, paths: Paths) -> int:
    failed = 0
    for owner, name in registry.list_names(paths):
        try:
            vm = registry.resolve(paths, owner, name)
            settings = registry.read_settings(vm)
            if settings["service"] and settings["autostart"] and not registry.is_running(vm):
                _start(who, paths, vm)
        except KvmgateError as err:
            failed += 1
            sys.stderr.write(f"kvmgate: autostart {owner}/{name}: {err}\n")
    return 1 if failed else 0


def watch(who: Caller, paths: Paths, target: str) -> int:
    """Start the VM if needed, then wait for QEMU: exit 0 if kvmgate ended it on
    purpose (stop, hibernate, or this watcher's SIGTERM), 1 if it died."""
    owner, sep, name = target.partition(":")
    if not sep:
        raise UsageError("admin watch takes OWNER:NAME (the kvmgate-vm@ unit's instance)")
    ident.check_owner(owner)
    vm = registry.resolve(paths, owner, ident.check_name(name))

    def on_term(signum: int, frame: FrameType | None) -> None:
        from .vmctl import stop

        req = Request("stop")
        req.name = name
        stop(req, who, paths, vm)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if not registry.is_running(vm):
        _start(who, paths, vm)
    sys.stdout.flush()
    registry.wait_exit(vm)
    if registry.take_intended_exit(vm) or hibernate.meta_of(vm) is not None:
        return 0
    sys.stderr.write(f"kvmgate: {owner}/{name}: QEMU exited unexpectedly\n")
    registry.cleanup_runtime(vm)
    return 1
