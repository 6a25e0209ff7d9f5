"""The privileged side of wake on connect: what `kvmgate-gated` (an unprivileged
daemon, running as the `kvmgate-gated` account) may ask of the helper through
sudo, and the admin's `--wake` settings.

gated may: read the listener table, wake a VM (thaw, restore or start it), hold
a VM's owner "logged on" while connections are open, and ask for an idle VM to
be frozen per its policy (refused while the owner has a live session).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import socket
from typing import Any

from .. import identity as ident
from .. import registry
from ..errors import KvmgateError, NoSuchVM, PermissionRefused, UsageError
from ..paths import Paths
from .caller import Caller
from .main import Request

GATED_USER = "kvmgate-gated"


def require_gated(who: Caller) -> None:
    if who.is_root:
        return
    try:
        if pwd.getpwnam(GATED_USER).pw_uid == who.uid:
            return
    except KeyError:
        pass
    raise PermissionRefused("only kvmgate-gated may ask for this")


def _target(paths: Paths, target: str) -> registry.VM:
    owner, sep, name = target.partition(":")
    if not sep:
        raise UsageError("expected OWNER:NAME")
    return registry.resolve(paths, ident.check_owner(owner), ident.check_name(name))


def config(paths: Paths) -> list[dict[str, Any]]:
    rows = []
    for owner, name in registry.list_names(paths):
        with contextlib.suppress(KvmgateError):
            vm = registry.resolve(paths, owner, name)
            s = registry.read_settings(vm)
            for w in s["wake"]:
                rows.append(
                    {"owner": owner, "name": name, "listen": w["listen"], "internal": w["internal"], "idle": s["idle"]}
                )
    return rows


def run(req: Request, who: Caller, paths: Paths) -> int:
    require_gated(who)
    from . import hibernate, sessions
    from .logon import Sessions

    if req.verb == "gated-config":
        print(json.dumps(config(paths)))
        return 0
    vm = _target(paths, req.name or "")
    if not who.is_root and not registry.read_settings(vm)["wake"]:
        raise NoSuchVM(vm.identity.name)  # gated acts only on VMs the admin gave wake ports
    root = Caller(0, "gated", False)
    if req.verb == "gated-wake":
        if registry.is_running(vm):  # thaw is a no-op for a VM whose vCPUs run
            r = Request("thaw")
            r.name = vm.identity.name
            return sessions.run(r, root, paths, vm)
        from .vmctl import start

        r = Request("start")
        r.name = vm.identity.name
        return start(r, root, paths, vm)  # restores a hibernated VM, starts a stopped one
    if req.verb == "gated-hold":
        # A session record held by gated itself (its pid and start time): it dies with gated.
        pid = int(req.flag("--pid") or "0")
        st = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name if pid > 0 else ""
        if st != GATED_USER and not who.is_root:
            raise PermissionRefused("--pid must be kvmgate-gated's own process")
        s = Sessions(paths, vm.identity.owner)
        with s.locked():
            if req.flag("--on") is not None:
                s.add(pid, tag=f"gated-{vm.key}")
            else:
                s.remove(pid, tag=f"gated-{vm.key}")
        return 0
    if req.verb == "gated-idle":
        s = Sessions(paths, vm.identity.owner)
        with s.locked():
            live = s.prune()[1]
        mode = registry.read_settings(vm)["on_logoff"]
        if live or mode == "none" or not registry.is_running(vm) or hibernate.meta_of(vm) is not None:
            return 0
        r = Request("freeze" if mode == "pause" else "hibernate")
        r.name = vm.identity.name
        return sessions.run(r, root, paths, vm)
    raise UsageError(f"unknown verb {req.verb}")


def set_wake(paths: Paths, vm: registry.VM, spec: str) -> list[dict[str, int]]:
    """`--wake LISTEN:GUEST[,LISTEN:GUEST...]` or `none`. Listen ports are unique on
    the host; each gets a loopback port that QEMU forwards to the guest port."""
    if spec == "none":
        return []
    pairs = []
    for item in spec.split(","):
        a, sep, b = item.partition(":")
        if not (sep and a.isdigit() and b.isdigit() and 1024 <= int(a) <= 65535 and 1 <= int(b) <= 65535):
            raise UsageError("--wake takes LISTEN:GUEST port pairs, listen ports 1024-65535 (or none)")
        pairs.append((int(a), int(b)))
    lock = os.open(os.path.join(paths.state, ".ports.lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken_listen, taken_internal = set(), set()
        for row in config(paths):
            if (row["owner"], row["name"]) != (vm.identity.owner, vm.identity.name):
                taken_listen.add(row["listen"])
                taken_internal.add(row["internal"])
        out = []
        busy = taken_listen | taken_internal | {listen for listen, _ in pairs}
        for listen, guest in pairs:
            if listen in taken_listen or listen in taken_internal:
                raise KvmgateError(f"--wake: port {listen} is already assigned to another VM")
            internal = next(p for p in registry.INTERNAL_PORTS if p not in busy and _free(p))
            busy.add(internal)
            out.append({"listen": listen, "guest": guest, "internal": internal})
        return out
    finally:
        os.close(lock)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
