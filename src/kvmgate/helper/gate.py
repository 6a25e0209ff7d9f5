"""The privileged side of wake on connect: what `kvmgate-gated` (an unprivileged
daemon, running as the `kvmgate-gated` account) may ask of the helper through
sudo.

gated may: read the listener table, wake a VM (thaw, restore or start it), hold
a VM's owner "logged on" while connections are open, and ask for an idle VM to
be frozen per its policy (refused while the owner has a live session).
"""

from __future__ import annotations

import json
import os
import pwd
from typing import Any

from .. import identity as ident
from .. import registry
from ..errors import NoSuchVM, PermissionRefused, UsageError
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
    """gated's listener table: every forwarded port of every VM that wakes on connect."""
    from . import config as policy_config

    bind = policy_config.load(paths).net.ports.bind
    rows = []
    for vm, s in registry.all_settings(paths):
        for f in s["forwards"] if s["wake"] else []:
            if f["internal"]:
                rows.append(
                    {
                        "owner": vm.identity.owner,
                        "name": vm.identity.name,
                        "bind": bind,
                        "listen": f["port"],
                        "internal": f["internal"],
                        "idle": s["idle"],
                    }
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
