"""stop, reset, freeze, thaw, hibernate: the owner's (or root's) verbs that change a
running or hibernated VM. Each is a thin shell over `ops.power`."""

from __future__ import annotations

from kvmgate.errors import EXIT_FORCED, UsageError
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.model.settings import parse_seconds
from kvmgate.ops import power
from kvmgate.paths import Paths
from kvmgate.verbs.common import target


def run(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    name = vm.identity.name
    if req.verb == "stop" and req.has("--discard"):
        if req.has("--force") or req.flag("--timeout") is not None:
            raise UsageError("--discard takes neither --force nor --timeout")
        freed = power.discard(paths, who, vm)
        print(f"discarded the saved state of {name} ({freed >> 20} MiB); its next start boots afresh")
        return 0
    if req.verb == "stop":
        t = req.flag("--timeout")
        timeout = None if t is None else float(parse_seconds(t, "--timeout", limit=3600))
        stopped = power.stop(paths, who, vm, force=req.has("--force"), timeout=timeout)
        print(f"stopped {name} ({stopped.how})")
        return EXIT_FORCED if stopped.forced else 0
    if req.verb == "reset":
        power.reset(paths, who, vm)
        print(f"reset {name}")
        return 0
    if req.verb == "freeze":
        print(f"froze {name}" if power.freeze(paths, who, vm) else f"{name} is already frozen")
        return 0
    if req.verb == "thaw":
        changed, restored = power.thaw(paths, who, vm)
        if restored is not None:
            print(f"restored {name} (pid {restored.pid}, accel {restored.accel})")
        else:
            print(f"thawed {name}" if changed else f"{name} is already running")
        return 0
    if req.verb == "hibernate":
        saved = power.hibernate(paths, who, vm)
        print(f"hibernated {name} ({saved.size >> 20} MiB saved)")
        return 0
    raise UsageError(f"unknown verb {req.verb}")
