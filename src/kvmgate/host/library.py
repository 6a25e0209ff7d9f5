"""What a start opens for a VM made from a library image: the image itself,
and its cloud-init seed. Loaded only for such VMs.

The library image is root's (STATE/images is root-only): root opens it
read-only and hands QEMU the descriptor as the backing node of the owner's
overlay. The seed is built in memory from the owner's keys (read with the
owner's rights, `host.keys`) and handed over as a sealed, read-only memfd.
"""

from __future__ import annotations

import json
import os
import pwd
import stat

from kvmgate.errors import FileRefused
from kvmgate.model import cloudinit, qcow2
from kvmgate.model.policy.grammar import Limits
from kvmgate.model.translate import Resource
from kvmgate.store.files import write_atomic

KEYS_RECORD = "keys.json"  # log/keys.json: which keys the last start's seed holds (`kvmgate keys`)
_pending: dict[str, str] = {}  # log directory -> its keys record, written once QEMU runs (`commit`)


def open_base(r: Resource) -> int:
    missing = FileRefused("the VM's library image is missing or damaged: ask the administrator")
    try:
        fd = os.open(r.path or "", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise missing from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o222:
            raise missing
        qcow2.inspect(os.pread(fd, qcow2.HEADER_READ, 0))
    except BaseException as err:
        os.close(fd)
        if isinstance(err, FileRefused):
            raise missing from None
        raise
    return fd


def seed(r: Resource, pw: pwd.struct_passwd, limits: Limits, logdir: str) -> int:
    from kvmgate.host import blobs, keys

    found, skipped = keys.read(pw, limits.keys_max_kib)
    data = cloudinit.seed_image(r.text or "{}", found)
    _pending[logdir] = json.dumps(cloudinit.record(found, skipped), sort_keys=True)
    memfd = blobs.sealed("kvmgate-seed", data)
    try:
        # QEMU opens the seed read-only: its fd set needs a read-only descriptor.
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(memfd)


def commit(logdir: str) -> None:
    """After QEMU answered: record which keys its seed holds. A refused start
    changes nothing, this record included."""
    text = _pending.pop(logdir, None)
    if text is not None:
        write_atomic(os.path.join(logdir, KEYS_RECORD), text)
