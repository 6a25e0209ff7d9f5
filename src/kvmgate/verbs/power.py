"""stop, reset, freeze, thaw, hibernate: the owner's (or root's) verbs that change a
running or hibernated VM. Each is a thin shell over `ops.power`."""

from __future__ import annotations

from kvmgate.errors import EXIT_FORCED, UsageError
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.model.settings import parse_seconds
from kvmgate.ops import power, relay, resume
from kvmgate.paths import Paths
from kvmgate.store import registry
from kvmgate.verbs.common import emit, target


def run(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    name = vm.identity.name
    if (code := relay.route(req, who, paths, vm)) is not None:  # the Slurm backend: on the VM's node
        return code
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
    if req.verb == "snapshot":
        return _snapshot(req, who, paths, vm)
    if req.verb == "reset":
        power.reset(paths, who, vm)
        print(f"reset {name}")
        return 0
    if req.verb == "freeze":
        print(f"froze {name}" if power.freeze(paths, who, vm) else f"{name} is already frozen")
        return 0
    if req.verb == "thaw":
        changed, restored = resume.thaw(paths, who, vm)
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


def _tag(raw: str) -> str:
    from kvmgate.model.identity import check_name

    try:
        return check_name(raw)
    except UsageError:
        raise UsageError(f"invalid snapshot tag {raw[:40]!r}: a-z and 0-9, with single '-' or '_' between") from None


def _snapshot(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    from kvmgate.ops import snapshots

    tag, gone = req.flag("TAG"), req.flag("--delete")
    if sum(x is not None for x in (tag, gone)) + req.has("--list") != 1:
        raise UsageError("snapshot takes a TAG, --list or --delete TAG")
    if req.has("--list"):
        rows = snapshots.listed(paths, vm)
        text = "".join(f"{r['tag']:<32} {r['date']} {r['vm_state_bytes'] >> 20} MiB of VM state\n" for r in rows)
        emit(rows, text or f"{vm.identity.name} has no snapshots\n", req.as_json)
        return 0
    if gone is not None:
        snapshots.delete(paths, who, vm, _tag(gone))
        print(f"deleted the snapshot {gone} of {vm.identity.name}")
        return 0
    snapshots.take(paths, who, vm, _tag(tag or ""))
    print(f"saved the snapshot {tag} of {vm.identity.name}: kvmgate start {vm.identity.name} -- -loadvm {tag}")
    return 0
