"""VM-state snapshots, for `-loadvm`: `kvmgate snapshot NAME TAG`, `--list`,
`--delete TAG`.

A snapshot is QEMU's own internal snapshot: the VM's memory and device state,
kept in its first writable qcow2 disk, with every writable qcow2 disk's
contents at that moment. It is taken by QEMU's `snapshot-save` job (and
removed by `snapshot-delete`) under the VM's lock, on the disks QEMU already
has open: kvmgate opens nothing for it. A VM whose writable disks include a raw
one, or that runs with -snapshot (its writes are thrown away), is refused.
Listing a stopped VM's snapshots reads its disks with `qemu-img info`, run with
the owner's rights; deleting one needs the VM running (QEMU holds the lock on
the images), which keeps a single path for every change of a disk.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
from typing import Any

from kvmgate.errors import KvmgateError, PolicyError, QMPError, WrongState
from kvmgate.host import audit
from kvmgate.host.caller import Caller
from kvmgate.model.translate import Plan, Resource
from kvmgate.ops.lifecycle import lock, qmp
from kvmgate.ops.plan import plan_for
from kvmgate.paths import Paths
from kvmgate.store import config, live, registry, runtime

JOB_SECONDS = 3600


def _disks(paths: Paths, vm: registry.VM, options: list[str]) -> tuple[Plan, list[Resource]]:
    plan = plan_for(vm, config.load(paths), options, "tcg")
    return plan, [r for r in plan.resources if r.kind == "disk" and r.writable]


def _snapshottable(paths: Paths, vm: registry.VM) -> list[str]:
    """The qcow2 nodes of the running VM's writable disks, or a refusal."""
    plan, disks = _disks(paths, vm, live.read_options(vm))
    if plan.snapshot:
        raise PolicyError("snapshot", f"{vm.identity.name} runs with -snapshot: its writes are thrown away")
    if not disks:
        raise PolicyError("snapshot", f"{vm.identity.name} has no writable disk to keep a snapshot in")
    raw = next((r for r in disks if r.fmt != "qcow2"), None)
    if raw is not None:
        raise PolicyError("snapshot", f"-{raw.of} {raw.path} is raw: snapshots need qcow2 disks")
    return [f"{r.of}-fmt" for r in disks]


def _job(vm: registry.VM, command: str, args: dict[str, Any]) -> None:
    """Run a QMP job to its end; its error, if any, as a refusal in QEMU's words."""
    job = f"kg-{command}"
    with qmp(vm, timeout=30) as q:
        q.execute(command, {"job-id": job, **args})
        deadline = time.monotonic() + JOB_SECONDS
        while True:
            state = next((j for j in q.execute("query-jobs") if j.get("id") == job), None)
            if state is None or state.get("status") == "concluded":
                break
            if time.monotonic() > deadline:
                raise KvmgateError(f"{vm.identity.name}: {command} did not finish in time")
            time.sleep(0.05)
        with_error = state.get("error") if state else None
        if state is not None:
            q.execute("job-dismiss", {"id": job})
    if with_error:
        raise PolicyError("snapshot", str(with_error)[:300])


def take(paths: Paths, who: Caller, vm: registry.VM, tag: str) -> None:
    with lock(paths, who, vm):
        if not runtime.is_running(vm):
            raise WrongState(f"{vm.identity.name} is not running: a snapshot saves a running VM's state")
        nodes = _snapshottable(paths, vm)
        if tag in {s["tag"] for s in _listed_running(vm)}:
            raise WrongState(f"{vm.identity.name} already has a snapshot {tag} (delete it first)")
        try:
            _job(vm, "snapshot-save", {"tag": tag, "vmstate": nodes[0], "devices": nodes})
        except QMPError as err:
            raise KvmgateError(f"{vm.identity.name}: QEMU refused the snapshot: {err}") from None
        audit.done(paths.audit_log, who, "snapshot", vm.identity.owner, vm.identity.name, tag=tag)


def delete(paths: Paths, who: Caller, vm: registry.VM, tag: str) -> None:
    with lock(paths, who, vm):
        if not runtime.is_running(vm):
            raise WrongState(f"{vm.identity.name} is not running: start it (paused) to delete a snapshot")
        nodes = _snapshottable(paths, vm)
        if tag not in {s["tag"] for s in _listed_running(vm)}:
            raise PolicyError("snapshot", f"{vm.identity.name} has no snapshot {tag}")
        _job(vm, "snapshot-delete", {"tag": tag, "devices": nodes})
        audit.done(paths.audit_log, who, "snapshot delete", vm.identity.owner, vm.identity.name, tag=tag)


def listed(paths: Paths, vm: registry.VM) -> list[dict[str, Any]]:
    if runtime.is_running(vm):
        return _listed_running(vm)
    _, disks = _disks(paths, vm, [])
    pw = pwd.getpwnam(vm.identity.owner)
    found: dict[str, dict[str, Any]] = {}
    for r in disks:
        if r.fmt != "qcow2" or r.path is None:
            continue
        argv = ["qemu-img", "info", "--output=json", "-f", "qcow2", r.path]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, user=pw.pw_uid, group=pw.pw_gid,
                           extra_groups=[], env={"PATH": "/usr/bin:/bin"}, check=False)  # fmt: skip
        if p.returncode == 0:
            for s in json.loads(p.stdout).get("snapshots", []):
                found.setdefault(str(s.get("name")), _row(s))
    return sorted(found.values(), key=lambda s: s["date"])


def _listed_running(vm: registry.VM) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with qmp(vm, timeout=30) as q:
        for dev in q.execute("query-block"):
            image = (dev.get("inserted") or {}).get("image") or {}
            for s in image.get("snapshots", []):
                found.setdefault(str(s.get("name")), _row(s))
    return sorted(found.values(), key=lambda s: s["date"])


def _row(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "tag": str(s.get("name")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(s.get("date-sec", 0)))),
        "vm_state_bytes": int(s.get("vm-state-size", 0)),
    }
