"""What a VM looks like to the people who may see it: state, addresses, ports.
Read-only; no lock (a reader sees one consistent state or the next)."""

from __future__ import annotations

import os
import pwd
import time
from typing import Any

from kvmgate.errors import QMPError
from kvmgate.host import sockets
from kvmgate.host.qmp import QMP
from kvmgate.model.hostnet import redirs
from kvmgate.model.policy.policy import Policy
from kvmgate.paths import GATED_USER
from kvmgate.store import note, registry, runtime

PAUSED = ("paused", "prelaunch", "suspended", "postmigrate")


def vcpu_state(vm: registry.VM) -> str:
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=5) as q:
            return str(q.execute("query-status").get("status"))
    except (OSError, QMPError):
        return "unknown"


def describe(vm: registry.VM) -> dict[str, Any]:
    running = runtime.is_running(vm)
    saved = None if running else registry.read_saved(vm)
    info: dict[str, Any] = {
        "name": vm.identity.name,
        "owner": vm.identity.owner,
        "state": "running" if running else "hibernated" if saved else "stopped",
        "directory": vm.vmdir,
        "key": vm.key,
    }
    if saved:
        info["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved.saved_at))
        info["saved_bytes"] = saved.size
    if running:
        info["pid"] = runtime.read_pid(vm)
        info["qemu_status"] = vcpu_state(vm)
        if info["qemu_status"] in PAUSED:
            info["state"] = "paused"
        why = note.read(vm)
        if why:
            info["note"] = why
    return info


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
