"""status, list, ports, vnc: what the owner (or root) may read about VMs."""

from __future__ import annotations

import os
import pwd
import socket
from typing import Any

from kvmgate.errors import KvmgateError, UsageError, WrongState
from kvmgate.host import sockets
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.ops import relay
from kvmgate.ops.inspect import addresses, describe, details, forwarded
from kvmgate.paths import Paths
from kvmgate.store import config, display, every, registry, runtime
from kvmgate.verbs.common import emit, owner_of, target


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "list":
        return services(req, paths) if req.has("--services") else vms(req, who, paths)
    vm = target(req, who, paths)
    if (code := relay.route(req, who, paths, vm)) is not None:  # the Slurm backend: on the VM's node
        return code
    if req.verb == "status":
        try:
            policy = config.load(paths)
        except KvmgateError:  # a policy kvmgate refuses: the state can still be shown
            policy = None
        info = details(policy, vm)
        info["networks"] = addresses(vm)
        text = "".join(f"{k}: {_shown(v)}\n" for k, v in info.items() if k != "networks")
        text += "".join(f"network: {a['network']} mac {a['mac']} ip {a['ip'] or '-'}\n" for a in info["networks"])
        emit(info, text, req.as_json)
        return 0
    if req.verb == "ports":
        rows = forwarded(config.load(paths), vm)
        text = "".join(
            f"{r['service']:<12} {r['host']}:{r['port']} -> guest:{r['guest_port']} ({r['via']})\n" for r in rows
        )
        emit(rows, text or f"{vm.identity.name} has no forwarded ports\n", req.as_json)
        return 0
    if req.verb == "vnc":
        return vnc(req, vm)
    raise UsageError(f"unknown verb {req.verb}")


def _shown(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def vms(req: Request, who: Caller, paths: Paths) -> int:
    owner = owner_of(req, who) if (req.has("--owner") or not who.is_root) else None  # root: everyone's
    rows = [
        {"name": vm.identity.name, "owner": vm.identity.owner, "state": describe(vm)["state"]}
        for vm in every.each_vm(paths, owner)
    ]
    text = "".join(f"{r['owner']:<16} {r['name']:<32} {r['state']}\n" for r in rows)
    if not rows:
        text = "no VMs\n" if owner is None else f"{owner} has no VMs\n"
    elif os.isatty(1):  # a header for people; scripts read --json
        text = f"{'OWNER':<16} {'NAME':<32} STATE\n" + text
    emit(rows, text, req.as_json)
    return 0


def services(req: Request, paths: Paths) -> int:
    """Service VMs, for everyone to see (their name and state, nothing to control)."""
    rows = []
    for vm in every.each_vm(paths):
        if registry.read_settings(vm).service:
            rows.append(
                {
                    "name": vm.identity.name,
                    "owner": vm.identity.owner,
                    "state": describe(vm)["state"],
                    "addresses": [a for a in addresses(vm) if a["ip"]],
                }
            )
    text = "".join(
        f"{r['name']:<32} {r['state']:<11} " + " ".join(f"{a['network']}:{a['ip']}" for a in r["addresses"]) + "\n"
        for r in rows
    )
    emit(rows, text, req.as_json)
    return 0


def vnc(req: Request, vm: registry.VM) -> int:
    """How the owner reaches the VM's display; nothing listens on a
    public address. Read from the record the start wrote, not from QEMU's argv."""
    if not runtime.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    record = display.read_display(vm)
    host, owner = socket.gethostname(), vm.identity.owner
    info: dict[str, Any]
    vnc = record.get("vnc")
    if not isinstance(vnc, dict):
        raise WrongState(f"{vm.identity.name} has no display (it runs with -nographic, or TCP VNC without -vnc)")
    if vnc.get("kind") == "unix":
        path = vnc.get("socket")
        info = {
            "kind": "unix",
            "socket": path,
            "tunnel": f"ssh -N -L 5900:{path} {owner}@{host}",
            "viewer": "vncviewer localhost:5900 (after the tunnel)",
        }
    else:
        port = vnc.get("port")
        uid = pwd.getpwnam(owner).pw_uid
        if not isinstance(port, int) or not sockets.held_by(port, uid):
            raise WrongState(f"{vm.identity.name}: its VNC port is not held by the VM; not showing it")
        info = {
            "kind": "tcp",
            "host": "127.0.0.1",
            "port": port,
            "password": vnc.get("password"),
            "tunnel": f"ssh -N -L {port}:127.0.0.1:{port} {owner}@{host}",
            "viewer": f"vncviewer 127.0.0.1::{port}",
        }
    emit(info, "".join(f"{k}: {v}\n" for k, v in info.items()), req.as_json)
    return 0
