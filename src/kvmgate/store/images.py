"""The admin's image library on disk.

    STATE/images/                 root 0700   nobody else can reach a file in it by name
    STATE/images/NAME.json        root 0600   the record (model.images.Record, versioned)
    STATE/images/ID.qcow2         root 0444   the image, never written again
    STATE/images/.stage-PID-N/    root 0700   an add in progress (removed by admin reap if its PID died)

Users never read an image by name: a VM made from one gets its descriptor,
opened by root at each start, as the read-only backing node of the VM's own
overlay. The data file is named by a random id, so a name removed and added
again is a different image to every overlay.

Publishing and removing happen under the allocation lock, as `admin create`
does: a VM can never be made from an image that is being removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from kvmgate.errors import KvmgateError, NoSuchVM, UsageError
from kvmgate.model import identity as ident
from kvmgate.model import images
from kvmgate.paths import Paths
from kvmgate.store import every, registry
from kvmgate.store.files import fsync_dir, read_small, write_atomic

STAGE = ".stage-"


class NoSuchImage(NoSuchVM):
    """No library image of that name (exit 4, like a VM)."""

    def __init__(self, name: str) -> None:
        KvmgateError.__init__(self, f"no such image: {name}")


def library(paths: Paths) -> str:
    return os.path.join(paths.state, "images")


def ensure(paths: Paths) -> str:
    registry.mkdir_root(library(paths), 0o700)
    return library(paths)


def check_name(name: str) -> str:
    """Library names follow the VM-name grammar (one set of rules for names)."""
    try:
        return ident.check_name(name)
    except UsageError:
        raise UsageError(f"invalid image name {name[:40]!r}: use the VM-name rules (a-z, 0-9, '-', '_')") from None


def read(paths: Paths, name: str) -> images.Record:
    check_name(name)
    try:
        rec = images.parse_record(read_small(os.path.join(library(paths), f"{name}.json")))
    except FileNotFoundError:
        raise NoSuchImage(name) from None
    if rec.name != name:
        raise KvmgateError(f"image record {name}.json names another image")
    return rec


def every_record(paths: Paths) -> list[images.Record]:
    try:
        names = sorted(n[:-5] for n in os.listdir(library(paths)) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        with contextlib.suppress(KvmgateError, UsageError, FileNotFoundError):
            out.append(read(paths, n))
    return out


def data_path(directory: str, rec_id: str) -> str:
    if not images.ID.fullmatch(rec_id):
        raise KvmgateError("bad image id")
    return os.path.join(directory, f"{rec_id}.qcow2")


def users(paths: Paths, rec: images.Record) -> list[str]:
    """OWNER/NAME of every VM whose disk is an overlay of this image."""
    out = []
    for owner, name in every.list_names(paths):
        with contextlib.suppress(KvmgateError):
            if registry.read_settings(registry.resolve(paths, owner, name)).image_id == rec.id:
                out.append(f"{owner}/{name}")
    return out


def stage(paths: Paths) -> str:
    d = os.path.join(ensure(paths), f"{STAGE}{os.getpid()}-{time.monotonic_ns()}")
    registry.mkdir_root(d, 0o700)
    return d


def publish(paths: Paths, rec: images.Record, staged_fd: int, staged: str) -> None:
    """Under the allocation lock: the data file into place, then its record."""
    directory = library(paths)
    if os.path.lexists(os.path.join(directory, f"{rec.name}.json")):
        raise UsageError(f"the library already has an image named {rec.name}")
    os.fchown(staged_fd, 0, 0)
    os.fchmod(staged_fd, 0o444)
    os.fsync(staged_fd)
    os.rename(staged, data_path(directory, rec.id))
    write_atomic(os.path.join(directory, f"{rec.name}.json"), rec.to_json(), 0o600, fsync=True)
    fsync_dir(directory)


def remove(paths: Paths, rec: images.Record) -> None:
    """Under the allocation lock, with no VM using it: the record first (the
    image is gone for every reader), then the data."""
    directory = library(paths)
    os.unlink(os.path.join(directory, f"{rec.name}.json"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_path(directory, rec.id))
    fsync_dir(directory)


VM_STAGES = (".import-", ".flatten-")  # in a VM's directory: `admin import`, `admin delete --keep-disks`


def clean_stages(paths: Paths) -> list[str]:
    """Stages whose process is gone (a crash, a kill -9): `admin reap`. Each
    stage's name carries the PID of the command that made it."""
    found = []
    for directory, prefixes in (
        (library(paths), (STAGE,)),
        *((os.path.join(paths.vms, v), VM_STAGES) for v in _vms(paths)),
    ):
        try:
            found += [(directory, n, p) for n in os.listdir(directory) for p in prefixes if n.startswith(p)]
        except OSError:
            continue
    removed = []
    for directory, n, prefix in found:
        pid = n[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
            removed.append(n)
    return removed


def _vms(paths: Paths) -> list[str]:
    try:
        return [n for n in os.listdir(paths.vms) if not n.startswith(".")]
    except FileNotFoundError:
        return []
