"""Where kvmgate keeps things. Fixed at install time, never taken from the caller.

`install.sh` writes `_install.py` next to this file (root-owned) with the
chosen locations; a source checkout without it uses the standard ones.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from kvmgate.model.regex import Regex

_SAFE = Regex(r"/[A-Za-z0-9_./-]*", re.ASCII)


class Paths(NamedTuple):
    etc: str = "/etc/kvmgate"
    state: str = "/var/lib/kvmgate"
    run: str = "/run/kvmgate"
    log: str = "/var/log/kvmgate"
    helper: str = "/usr/lib/kvmgate/kvmgate-helper"
    sudo: str = "/usr/bin/sudo"
    sudoers: str = "/etc/sudoers.d/kvmgate"
    cockpit: str = "/usr/share/cockpit/kvmgate"  # the Cockpit page (install.sh --cockpit)

    def checked(self) -> Paths:
        # These strings reach QEMU's option syntax (the VNC socket) and sudoers: keep them plain.
        for value in self:
            if not _SAFE.fullmatch(value) or ".." in value.split("/"):
                raise ValueError(f"unsafe install path {value!r}")
        return self

    @property
    def policy(self) -> str:
        return os.path.join(self.etc, "policy.toml")

    @property
    def vms(self) -> str:
        return os.path.join(self.state, "vms")

    @property
    def names(self) -> str:
        return os.path.join(self.state, "names")

    @property
    def audit_log(self) -> str:
        return os.path.join(self.log, "audit.log")


def installed() -> Paths:
    import importlib

    try:
        baked = importlib.import_module("kvmgate._install").PATHS
    except ImportError:
        return Paths()
    return Paths(**baked).checked()


def pause_control() -> str | None:
    """The test-only pause points' control file, if install.sh baked one in
    (--test-pause-points: the suite's own installation only; store/critical.py)."""
    import importlib

    try:
        return getattr(importlib.import_module("kvmgate._install"), "PAUSE_CONTROL", None)
    except ImportError:
        return None


# The system accounts kvmgate makes (`admin init`, `admin create --service`).
QEMU_GROUP = "kvmgate-qemu"  # QEMU's primary group; no user is ever a member
GATED_USER = "kvmgate-gated"  # the unprivileged wake-on-connect daemon
SERVICE_USER = "kvmgate-svc"  # the default owner of service VMs
IMAGE_USER = "kvmgate-image"  # qemu-img runs as this account on the admin's image files
