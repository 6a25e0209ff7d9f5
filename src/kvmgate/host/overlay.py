"""-snapshot overlays: made for a start by root as the owner, in constant
memory, and bounded while the VM runs (docs/security.md, "Bounds"). Imported
only by starts with -snapshot."""

from __future__ import annotations

import os
import pwd
import resource

from kvmgate.errors import FileRefused
from kvmgate.host import caller
from kvmgate.model import qcow2
from kvmgate.model.policy.grammar import Limits
from kvmgate.model.translate import Plan, Resource
from kvmgate.store.files import write_image


def create(pw: pwd.struct_passwd, tmpdir: str, size: int, of: Resource) -> int:
    """The -snapshot overlay, an unlinked file in the VM's tmp/ written as the
    owner in constant memory (three clusters, then a sparse extension). It grows
    while the VM runs only up to QEMU's RLIMIT_FSIZE (`size_limit`)."""
    try:
        image = qcow2.empty_image(size)
    except ValueError as err:  # a size the user's image header chose: odd, or too large
        raise FileRefused(f"{of.path}: no -snapshot overlay for this image ({err})") from None
    with caller.as_user(pw):
        fd = os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        write_image(fd, image)
    except BaseException:
        os.close(fd)
        raise
    return fd


def size_limit(plan: Plan, limits: Limits) -> int:
    """QEMU's RLIMIT_FSIZE. A VM with -snapshot writes to overlays in root's state
    tree: together they may hold `limits.snapshot_max_mib`, and past that the
    guest gets an I/O error (EFBIG, SIGXFSZ ignored). Without overlays QEMU writes
    only the owner's own disks (on the owner's storage), its logs and saved
    states, and gets no file size limit here."""
    overlays = sum(1 for r in plan.resources if r.kind == "overlay")
    if not overlays:
        return resource.RLIM_INFINITY
    return (limits.snapshot_max_mib << 20) // overlays
