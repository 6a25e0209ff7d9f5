"""start, stop, freeze, thaw, hibernate: the owner's (or root's) verbs that change
a VM's state. Each is a thin shell over `ops.lifecycle`."""

from __future__ import annotations

from kvmgate.errors import EXIT_FORCED, UsageError
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.ops import lifecycle
from kvmgate.paths import Paths
from kvmgate.verbs.common import target


def parse_seconds(flag: str, raw: str, limit: int) -> int:
    """Whole seconds, ASCII digits only: str.isdigit() also accepts superscripts and other scripts' digits."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or int(raw) > limit:
        raise UsageError(f"{flag} must be whole seconds between 0 and {limit}")
    return int(raw)


def run(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    name = vm.identity.name
    if req.verb == "start":
        s = lifecycle.start(paths, who, vm, list(req.options), paused=req.has("--paused"))
        print(f"{'restored' if s.restored else 'started'} {name} (pid {s.pid}, accel {s.accel})")
        return 0
    from kvmgate.ops import power  # off the start path

    if req.verb == "stop":
        t = req.flag("--timeout")
        timeout = None if t is None else float(parse_seconds("--timeout", t, 3600))
        stopped = power.stop(paths, who, vm, force=req.has("--force"), timeout=timeout)
        print(f"stopped {name} ({stopped.how})")
        return EXIT_FORCED if stopped.forced else 0
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
