"""The Slurm backend's relay: a verb about a VM that runs in a job on another
node is run there again, by the VM's owner, inside the VM's job (`srun --jobid
--overlap`, then sudo and the helper), where it is a local verb (docs/cluster.md).

Called first by each verb that reaches a running VM's QEMU (stop, reset, freeze,
thaw, hibernate, snapshot, console, status, ports, vnc). On the local backend it
costs one read of the cached policy and changes nothing.
"""

from __future__ import annotations

import os
import sys

from kvmgate.errors import EXIT_FORCED, Busy, KvmgateError
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request, unparse
from kvmgate.ops.plan import owner_pw
from kvmgate.paths import Paths
from kvmgate.store import config, registry


def route(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int | None:
    """The exit code of the request run on the VM's node, or None: handle it here."""
    try:
        policy = config.load(paths)
    except KvmgateError:
        return None  # a policy kvmgate refuses: the verb itself says so (status still shows the state)
    if not policy.backend.slurm:
        return None
    from kvmgate.ops import cluster

    try:
        rec = cluster.running_elsewhere(paths, policy, vm)
    except Busy:
        if req.verb == "status":
            return None  # status shows "starting"
        raise
    if rec is None:
        return None
    argv = unparse(req, drop=("--owner",))
    if who.uid == owner_pw(vm).pw_uid:  # the owner's own streams and terminal
        pty = req.verb == "console" and os.isatty(0) and not req.has("--expect")
        code, _, _ = cluster.relay(paths, policy, vm, rec, argv, pty=pty)
    else:  # root for the owner: the owner's process never holds root's terminal (output relayed after)
        code, out, err = cluster.relay(paths, policy, vm, rec, argv, capture=True, stdin=True)  # a pipe, not a tty
        sys.stdout.write(out)
        sys.stderr.write(err)
    if req.verb in ("stop", "hibernate") and code in (0, EXIT_FORCED):
        cluster.wait_ended(policy, vm, rec.job)  # the job is gone once the VM has stopped or hibernated
    return code
