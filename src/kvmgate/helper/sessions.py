"""freeze, thaw, hibernate: the verbs behind the design note's second logon path
(a VM frozen while its user is away, thawed when they come back)."""

from __future__ import annotations

import os

from .. import registry
from ..errors import KvmgateError, UsageError, WrongState
from ..paths import Paths
from ..qmp import QMP, QMPError
from . import audit, cgroup, hibernate
from .caller import Caller
from .main import Request
from .vmctl import PAUSED, start

# verb -> (QMP command, states in which there is nothing to do, past tense)
VCPU: dict[str, tuple[str, tuple[str, ...], str]] = {
    "freeze": ("stop", PAUSED, "froze"),
    "thaw": ("cont", ("running",), "thawed"),
}


def run(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    name = vm.identity.name
    running = registry.is_running(vm)
    if req.verb == "thaw" and not running:
        if hibernate.meta_of(vm) is None:
            raise WrongState(f"{name} is not running")
        return start(req, who, paths, vm)  # a hibernated VM thaws by being restored
    if not running:
        raise WrongState(f"{name} is not running")
    if req.verb in VCPU:
        command, already, done = VCPU[req.verb]
        try:
            with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=10) as q:
                if q.execute("query-status").get("status") in already:
                    print(f"{name} is already {'frozen' if req.verb == 'freeze' else 'running'}")
                    return 0
                q.execute(command)
        except QMPError as err:
            raise KvmgateError(f"{name}: the monitor refused: {err}") from None
        audit.done(paths.audit_log, who, req.verb, vm.identity.owner, name)
        print(f"{done} {name}")
        return 0
    if req.verb == "hibernate":
        options = registry.read_options(vm)
        if "-snapshot" in options:
            raise WrongState(f"{name} runs with -snapshot: its overlay ends with QEMU, so it cannot hibernate")
        registry.mark_intended_exit(vm)
        saved = hibernate.save(vm, options)
        if not registry.wait_stopped(vm, 30):
            raise KvmgateError(f"{name} was saved but QEMU did not exit")
        registry.cleanup_runtime(vm)
        cgroup.remove(vm.key)
        audit.done(paths.audit_log, who, "hibernate", vm.identity.owner, name, size=saved.size, sha256=saved.sha256)
        print(f"hibernated {name} ({saved.size >> 20} MiB saved)")
        return 0
    raise UsageError(f"unknown verb {req.verb}")
