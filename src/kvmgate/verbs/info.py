"""status, list, ports, vnc: what the owner (or root) may read about VMs."""

from __future__ import annotations

import os
import pwd
import socket
import stat
from typing import Any

from kvmgate.errors import KvmgateError, UsageError, WrongState
from kvmgate.host import sockets
from kvmgate.host.caller import Caller, as_user, drop_to
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
        node = _node(paths, vm)  # the Slurm backend: where they listen (reach them with `kvmgate tunnel`)
        rows = [{**r, "node": node} for r in rows] if node else rows
        emit(rows, text or f"{vm.identity.name} has no forwarded ports\n", req.as_json)
        return 0
    if req.verb == "vnc":
        return vnc(req, paths, vm)
    if req.verb == "tunnel":
        return tunnel(req, who, paths, vm)
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


def vnc(req: Request, paths: Paths, vm: registry.VM) -> int:
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
    node = _node(paths, vm)
    if node:  # the Slurm backend: the socket or port is on the VM's node, reached through its job
        info.update(node=node, tunnel=f"kvmgate tunnel {vm.identity.name} vnc  (a byte stream: e.g. socat "
                    f"TCP-LISTEN:5900,bind=127.0.0.1,fork EXEC:'kvmgate tunnel {vm.identity.name} vnc')")  # fmt: skip
        info["viewer"] = "vncviewer localhost:5900 (after the tunnel)"
    emit(info, "".join(f"{k}: {v}\n" for k, v in info.items()), req.as_json)
    return 0


def _node(paths: Paths, vm: registry.VM) -> str | None:
    from kvmgate.model.slurm import JobRecord
    from kvmgate.store import jobs

    rec = jobs.read_or_damaged(vm) if config.load(paths).backend.slurm else None
    return rec.node if isinstance(rec, JobRecord) else None


def tunnel(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    """The owner's byte stream to the VM's ssh port (checked to be held by its
    QEMU, as `kvmgate ssh` checks it) or its VNC endpoint, from root on the VM's
    node: nothing listens on a node's public address for it. Root connects with
    the owner's uid and groups (`as_user`): a socket the owner replaced by a link
    to another (D-Bus, munge, another VM's) is reached as the owner, or not at all.
    Connected, it drops to the caller for good before copying a byte (as `console`
    does): a connection the owner keeps open is the owner's process, not root's."""
    service = req.flag("SERVICE")
    if not runtime.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    pw = pwd.getpwnam(vm.identity.owner)
    if service == "ssh":
        rows = forwarded(config.load(paths), vm)
        row = next((r for r in rows if r["service"] == "ssh"), None) or next(
            (r for r in rows if r["guest_port"] == 22), None
        )
        if row is None:
            raise WrongState(f"{vm.identity.name} has no forwarded ssh port (the admin adds one with --forward ssh)")
        if not row["held"]:
            raise WrongState(f"{vm.identity.name}: its ssh port is not held by the VM; not connecting")
        with as_user(pw):
            sock = socket.create_connection(("127.0.0.1", row["port"]), timeout=10)
    elif service == "vnc":
        record = display.read_display(vm).get("vnc")
        if not isinstance(record, dict):
            raise WrongState(f"{vm.identity.name} has no display")
        if record.get("kind") == "unix":
            path = str(record.get("socket"))
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != pw.pw_uid:
                raise WrongState(f"{vm.identity.name}: its display socket is not QEMU's; not connecting")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            with as_user(pw):
                sock.connect(path)
        else:
            port = record.get("port")
            if not isinstance(port, int) or not sockets.held_by(port, pw.pw_uid):
                raise WrongState(f"{vm.identity.name}: its VNC port is not held by the VM; not connecting")
            with as_user(pw):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    else:
        raise UsageError("tunnel takes ssh or vnc")
    sock.settimeout(None)
    if not who.is_root:  # then the caller is the owner (`target` resolves only one's own VMs); root's own
        # tunnel stays root's: its terminal must never be in a process the owner may ptrace
        drop_to(pw.pw_uid, pw.pw_gid)
    from kvmgate.host.splice import pump

    pump(sock)
    return 0
