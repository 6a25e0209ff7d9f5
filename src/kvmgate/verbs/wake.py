"""The privileged side of wake on connect: what `kvmgate-gated` (an unprivileged
daemon, running as the `kvmgate-gated` account) may ask of the helper through
sudo.

gated may: read the listener table, wake a VM (thaw, restore or start it), hold
a VM's owner "logged on" while connections are open, say that a connection
used a VM (for the memory budget's "least recently used"), and ask for an idle
VM to be frozen per its policy (refused while the owner has a live session). It acts
only on VMs the admin gave wake ports.
"""

from __future__ import annotations

import json
import os
import pwd
from typing import Any

from kvmgate.errors import NoSuchVM, PermissionRefused, UsageError
from kvmgate.host.caller import Caller
from kvmgate.model import identity as ident
from kvmgate.model.commands import Request
from kvmgate.ops import power, resume
from kvmgate.paths import GATED_USER, Paths
from kvmgate.store import config, every, registry
from kvmgate.store.sessions import Sessions


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


def listeners(paths: Paths) -> list[dict[str, Any]]:
    """gated's listener table: every forwarded port of every VM that wakes on connect."""
    bind = config.load(paths).net.ports.bind
    return [
        {
            "owner": vm.identity.owner,
            "name": vm.identity.name,
            "bind": bind,
            "listen": f.port,
            "internal": f.internal,
            "idle": s.idle,
        }
        for vm, s in every.all_settings(paths)
        if s.wake
        for f in s.forwards
        if f.internal
    ]


def run(req: Request, who: Caller, paths: Paths) -> int:
    require_gated(who)
    if req.verb == "gated-config":
        print(json.dumps(listeners(paths)))
        return 0
    vm = _target(paths, req.name or "")
    if not who.is_root and not registry.read_settings(vm).wake:
        raise NoSuchVM(vm.identity.name)  # gated acts only on VMs the admin gave wake ports
    actor = Caller(0, "gated", False)
    if req.verb == "gated-wake":
        resume.wake(paths, actor, vm)
        return 0
    if req.verb == "gated-hold":
        # A session record held by gated itself (its pid and start time): it dies with gated.
        raw = req.flag("--pid") or "0"
        pid = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else 0
        st = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name if pid > 0 else ""
        if st != GATED_USER and not who.is_root:
            raise PermissionRefused("--pid must be kvmgate-gated's own process")
        s = Sessions(paths, vm.identity.owner)
        with s.locked():
            if req.has("--on"):
                s.add(pid, tag=f"gated-{vm.key}")
            else:
                s.remove(pid, tag=f"gated-{vm.key}")
        return 0
    if req.verb == "gated-used":
        # A connection through gated is a use of the VM (the memory budget hibernates
        # the least recently used). Only the mark's time changes; it is audited.
        from kvmgate.host import audit
        from kvmgate.store import note, runtime

        if runtime.is_running(vm):
            note.mark_used(vm)
            audit.done(paths.audit_log, actor, "used (a connection through kvmgate-gated)", vm.identity.owner,
                       vm.identity.name)  # fmt: skip
        return 0
    if req.verb == "gated-idle":
        sessions = Sessions(paths, vm.identity.owner)
        power.sleep(paths, actor, vm, registry.read_settings(vm).on_logoff, lambda: sessions.live() == 0)
        return 0
    raise UsageError(f"unknown verb {req.verb}")
