"""`start`: the owner's (or root's) verb that starts or restores a VM, a thin
shell over `ops.lifecycle`. The verbs that change a running VM are in
`verbs.power`, off the start path."""

from __future__ import annotations

from kvmgate.errors import UsageError
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.ops import budget
from kvmgate.paths import Paths
from kvmgate.verbs.common import target


def run(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    name = vm.identity.name
    if req.verb == "start":
        s = budget.start(paths, who, vm, list(req.options), paused=req.has("--paused"))
        print(f"{'restored' if s.restored else 'started'} {name} (pid {s.pid}, accel {s.accel})")
        return 0
    raise UsageError(f"unknown verb {req.verb}")
