"""The Slurm backend's verbs (docs/cluster.md): the job's node side
(`slurm-job`), `admin move` and `admin evacuate`, and the relay every verb about
a VM goes through when the VM runs in a job on another node (`route`, called by
the entry before the verb's own module)."""

from __future__ import annotations

from typing import Any

from kvmgate.errors import KvmgateError, PermissionRefused, UsageError, WrongState, one_line
from kvmgate.host.caller import Caller
from kvmgate.model import slurm
from kvmgate.model.commands import Request
from kvmgate.model.policy.policy import Policy
from kvmgate.ops import cluster, lifecycle
from kvmgate.paths import Paths
from kvmgate.store import config, every, jobs, registry
from kvmgate.verbs.common import emit, target


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "slurm-job":
        from kvmgate.ops import node

        return node.node_run(paths, who, req.name or "")
    policy = config.load(paths)
    if not policy.backend.slurm:
        raise WrongState("this host's backend is local: VMs do not run as Slurm jobs (kvmgate admin init --backend)")
    if req.verb == "admin-move":
        vm = target(req, who, paths)
        moved = move(paths, policy, who, vm, req.flag("--to"))
        print(f"moved {vm.identity.name} to node {moved.node} (job {moved.job})")
        return 0
    if req.verb == "admin-evacuate":
        return evacuate(req, paths, policy, who)
    raise UsageError(f"unknown verb {req.verb}")


def move(paths: Paths, policy: Policy, who: Caller, vm: registry.VM, to: str | None) -> lifecycle.Started:
    """Hibernate where it runs (a relayed hibernate, as its owner), restore where
    Slurm places it: --to NODE, or anywhere but the node it left."""
    if not who.is_root:
        raise PermissionRefused("admin move is for root only")
    if to is not None and not slurm.node_name_ok(to):
        raise UsageError(f"--to: {to[:64]!r} is not a node name")
    from kvmgate.host import slurm as hslurm

    if to is not None and not hslurm.known(policy.backend, "node", to):  # before anything is hibernated
        raise UsageError(f"--to: Slurm knows no node {to!r}")
    name = vm.identity.name
    rec = cluster.running_elsewhere(paths, policy, vm)
    if rec is None and registry.read_saved(vm) is None:
        raise WrongState(f"{name} is neither running nor hibernated: there is nothing to move")
    if rec is not None:
        if to is not None and rec.node == to:
            raise WrongState(f"{name} runs on node {to} already")
        code, _, err = cluster.relay(paths, policy, vm, rec, ["hibernate", name], capture=True)
        if code != 0 or registry.read_saved(vm) is None:
            said = one_line(err.strip().splitlines()[-1] if err.strip() else f"exit {code}")
            raise KvmgateError(f"{name} could not be hibernated on node {rec.node} ({said}); it was not moved")
        cluster.wait_ended(policy, vm, rec.job)
    to_token = cluster.TO.set(to)
    away_token = cluster.AWAY_FROM.set(rec.node if rec is not None else None)
    try:
        return lifecycle.start(paths, who, vm, [])
    finally:
        cluster.TO.reset(to_token)
        cluster.AWAY_FROM.reset(away_token)


def evacuate(req: Request, paths: Paths, policy: Policy, who: Caller) -> int:
    node = req.name or ""
    from kvmgate.host import slurm as hslurm

    if not slurm.node_name_ok(node) or not hslurm.known(policy.backend, "node", node):
        raise UsageError(f"Slurm knows no node {node[:64]!r}")
    rows: list[dict[str, Any]] = []
    for vm in every.each_vm(paths):
        rec = jobs.read_or_damaged(vm)
        if not isinstance(rec, slurm.JobRecord) or rec.node != node or rec.state != "running":
            continue
        row: dict[str, Any] = {"owner": vm.identity.owner, "name": vm.identity.name, "from": node}
        try:
            moved = move(paths, policy, who, vm, None)
            row.update(to=moved.node, job=moved.job)
        except KvmgateError as err:
            row["error"] = one_line(str(err))
        rows.append(row)
    text = "".join(
        f"{r['owner']}/{r['name']}: "
        + (f"moved to node {r['to']} (job {r['job']})" if "to" in r else f"NOT moved: {r['error']}")
        + "\n"
        for r in rows
    )
    emit(rows, text or f"no VM runs on node {node}\n", req.as_json)
    return 0 if all("to" in r for r in rows) else 1
