"""`start`: the owner's (or root's) verb that starts or restores a VM, a thin
shell over `ops.lifecycle`. The verbs that change a running VM are in
`verbs.power`, off the start path. The entry routes only `start` here."""

from __future__ import annotations

from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.ops import budget
from kvmgate.paths import Paths
from kvmgate.verbs.common import target


def run(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    s = budget.start(paths, who, vm, list(req.options), paused=req.has("--paused"))
    where = f" on node {s.node} (job {s.job}, " if s.job is not None else " ("  # the Slurm backend: where it runs
    print(f"{'restored' if s.restored else 'started'} {vm.identity.name}{where}pid {s.pid}, accel {s.accel})")
    return 0
