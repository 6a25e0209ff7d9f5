"""What every verb needs: whose VM a request is about, and output."""

from __future__ import annotations

import json
import sys

from kvmgate.errors import PermissionRefused
from kvmgate.host.caller import Caller
from kvmgate.model.commands import Request
from kvmgate.paths import Paths
from kvmgate.store import registry


def owner_of(req: Request, who: Caller) -> str:
    """Whose VMs the request is about: --owner is root's; everyone else acts on their own."""
    owner = req.flag("--owner")
    if owner is not None and not who.is_root and owner != who.name:
        raise PermissionRefused("--owner is for root only")
    return owner if (who.is_root and owner) else who.name


def target(req: Request, who: Caller, paths: Paths) -> registry.VM:
    return registry.resolve(paths, owner_of(req, who), req.name or "")


def emit(data: object, text: str, as_json: bool) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n" if as_json else text)
    sys.stdout.flush()
