"""What a VM looks like to the people who may see it: state, addresses, ports.
Read-only; no lock (a reader sees one consistent state or the next)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import time
from typing import Any

from kvmgate.errors import KvmgateError, QMPError
from kvmgate.host import sockets
from kvmgate.host.qmp import QMP
from kvmgate.model.hostnet import redirs
from kvmgate.model.policy.policy import Policy
from kvmgate.paths import GATED_USER
from kvmgate.store import live, note, registry, runs, runtime

PAUSED = ("paused", "prelaunch", "suspended", "postmigrate")


def vcpu_state(vm: registry.VM) -> str:
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=5) as q:
            return str(q.execute("query-status").get("status"))
    except (OSError, QMPError):
        return "unknown"


def describe(vm: registry.VM) -> dict[str, Any]:
    """State only: what `list` shows for every VM (cheap)."""
    running = runtime.is_running(vm)
    saved = None if running else registry.read_saved(vm)
    info: dict[str, Any] = {
        "name": vm.identity.name,
        "owner": vm.identity.owner,
        "state": "running" if running else "hibernated" if saved else "stopped",
        "directory": vm.vmdir,
        "key": vm.key,
    }
    if not running:
        _job(vm, info)
    if saved:
        info["saved_at"] = _when(saved.saved_at)
        info["saved_bytes"] = saved.size
        info["saved_by"] = f"QEMU {saved.qemu}, machine {saved.machine}"
    if running:
        info["pid"] = live.read_pid(vm)
        info["qemu_status"] = vcpu_state(vm)
        if info["qemu_status"] in PAUSED:
            info["state"] = "paused"
        why = note.read(vm)
        if info["qemu_status"] == "io-error":
            info["state"] = "paused"
            why = (
                "paused on a disk write error: its disk reached the owner's disk quota (kvmgate quota), or the "
                "host's disk is full; free space (or ask the admin for more), then `kvmgate thaw` retries the write"
            )
        if why:
            info["note"] = why
    return info


def _job(vm: registry.VM, info: dict[str, Any]) -> None:
    """The Slurm backend: a VM in a job on another node (ops.cluster); read from its
    record, not from QEMU (`status` itself is relayed to the node)."""
    if not os.path.exists(vm.sub("job.json")):
        return
    from kvmgate.store import jobs

    rec = jobs.read_or_damaged(vm)
    if isinstance(rec, KvmgateError) or rec is None or rec.state == "failed":
        return
    info["state"] = "running" if rec.state == "running" else "starting"
    info["node"], info["job_id"] = rec.node, rec.job


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def details(policy: Policy | None, vm: registry.VM) -> dict[str, Any]:
    """`status`: the state and what its owner would ask next: memory and vCPUs,
    since when it runs, its logoff policy, its ports, how its last run ended.
    Without a policy (one kvmgate refuses), what needs it is left out."""
    info = describe(vm)
    running = info["state"] in ("running", "paused")
    if policy is not None and policy.backend.slurm:
        info.setdefault("node", None)
        info.setdefault("job_id", None)
        from kvmgate.store import jobs

        rec = jobs.read_or_damaged(vm) if running else None
        if isinstance(rec, tuple) and rec.state == "running":  # status relayed to the node the VM runs on
            info["node"], info["job_id"] = rec.node, rec.job
    if policy is not None:
        _sizes(policy, vm, info, running)
    _runs(vm, info, running)
    return info


def _sizes(policy: Policy, vm: registry.VM, info: dict[str, Any], running: bool) -> None:
    from kvmgate.ops.plan import plan_for

    options: list[str] = []
    if running:
        with contextlib.suppress(KvmgateError):
            options = live.read_options(vm)
    plan = plan_for(vm, policy, options, "tcg")
    argv = list(plan.argv)
    smp = argv[argv.index("-smp") + 1] if "-smp" in argv else "1"
    info["memory_mib"] = plan.memory_mib
    count = re.match(r"(?:cpus=)?([0-9]+)", smp)
    info["vcpus"] = int(count.group(1)) if count else 1
    settings = registry.read_settings(vm)
    info["on_logoff"] = settings.on_logoff
    info["logoff_delay"] = policy.logoff_delay_seconds if settings.logoff_delay is None else settings.logoff_delay
    info["forwards"] = [f"{r['service']} {r['host']}:{r['port']}" for r in forwarded(policy, vm)]
    info["image"] = settings.image  # the library image under its disk (None: a disk of its own)
    info["template"] = settings.template  # the template its owner made it from (None: the admin made it)
    info["on_pressure"] = settings.on_pressure
    info["cloud_init"] = settings.cloud_init


def _runs(vm: registry.VM, info: dict[str, Any], running: bool) -> None:
    run = runs.read(vm)
    started = run.get("started_at")
    if running and isinstance(started, (int, float)):
        info["started_at"] = _when(started)
        info["uptime_seconds"] = int(time.time() - started)
    elif not running and isinstance(started, (int, float)):
        info["last_run"] = _ending(vm, run)


def _ending(vm: registry.VM, run: dict[str, Any]) -> dict[str, Any]:
    ended = run.get("ended")
    if isinstance(ended, dict) and isinstance(ended.get("at"), (int, float)):
        return {"ended": _when(ended["at"]), "how": str(ended.get("how"))}
    if run.get("boot_id") != runs.boot_id():
        return {"how": "killed at host crash (the host went down while it ran)"}
    last = {"how": "QEMU exited by itself (a crash, or the guest powered off)"}
    said = live.log_tail(vm, 1)
    if said:
        last["qemu_said"] = said[0][-300:]
    return last


def addresses(vm: registry.VM) -> list[dict[str, Any]]:
    """The VM's NICs on named networks: what users need to reach it (and service VMs)."""
    return [{"network": n.network, "mac": n.mac, "ip": n.ip} for n in registry.read_settings(vm).nics]


def forwarded(policy: Policy, vm: registry.VM) -> list[dict[str, Any]]:
    """The VM's host ports: `--forward`s (through kvmgate-gated when it wakes the VM)
    and the note's `-redir`s. `held` says whether the port is listened on by the
    process that should hold it (the running QEMU, as the owner; kvmgate-gated):
    anything else on it is another user's program, which `kvmgate ssh` refuses."""
    rows: list[dict[str, Any]] = [
        {
            "service": f.service,
            "guest_port": f.guest,
            "host": policy.net.ports.bind,
            "port": f.port,
            "via": "kvmgate-gated" if f.internal else "qemu",
        }
        for f in registry.read_settings(vm).forwards
    ]
    rows += [
        {
            "service": f"redir-{r.proto}",
            "guest_port": r.guest_port,
            "host": "127.0.0.1",
            "port": r.host_port,
            "via": "qemu",
        }
        for r in redirs(vm.identity.tokens)
    ]
    running = runtime.is_running(vm)
    owner, gated = _uid(vm.identity.owner), _uid(GATED_USER)
    for row in rows:
        expected = gated if row["via"] == "kvmgate-gated" else owner if running else None
        row["held"] = expected is not None and sockets.held_by(row["port"], expected)
    return rows


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
