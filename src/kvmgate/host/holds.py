"""A hibernated VM keeps its disks: until it is restored or its saved state is
discarded, no other VM may open one of its images read-write (its restore would
find the image changed under the memory it saved). QEMU's own image locks end
with QEMU, so kvmgate keeps the hold itself.

At hibernate, each image the VM's QEMU has open for writing is identified through
/proc/PID/fd (the very file QEMU opened, whatever its name is now) and written to
STATE/holds/<key>.json. A start that opens an image read-write while any hold
exists compares the image's identity with every hold but its own VM's. An
identity is the file handle (name_to_handle_at) with the filesystem's id
(statvfs f_fsid, derived from the filesystem's UUID on ext4 and xfs, the
server's export on NFS): the same on every node that mounts the state, where
device numbers are not. A filesystem without file handles falls back to device
and inode. Loaded only by a hibernate, a restore, a discard, a delete, or a start
while some VM is hibernated.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable

from kvmgate.errors import FileRefused
from kvmgate.model.translate import Plan
from kvmgate.paths import Paths
from kvmgate.store import registry
from kvmgate.store.files import fsync_dir, read_small, write_atomic

AT_EMPTY_PATH = 0x1000
MAX_HANDLE = 128


def file_id(fd: int) -> str:
    """The identity of the file open on `fd`, the same for every path to it."""
    import ctypes  # here only: ctypes costs start-up time

    class FileHandle(ctypes.Structure):
        _fields_ = [
            ("handle_bytes", ctypes.c_uint),
            ("handle_type", ctypes.c_int),
            ("f_handle", ctypes.c_ubyte * MAX_HANDLE),
        ]

    fh = FileHandle(MAX_HANDLE)
    mount_id = ctypes.c_int()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH) == 0:
        handle = bytes(fh.f_handle[: fh.handle_bytes]).hex()
        return f"fh:{os.fstatvfs(fd).f_fsid:x}:{fh.handle_type}:{handle}"
    st = os.fstat(fd)
    return f"dev:{st.st_dev}:{st.st_ino}"


def _dir(paths: Paths) -> str:
    return os.path.join(paths.state, "holds")


def any_held(paths: Paths) -> bool:
    try:
        return any(n.endswith(".json") for n in os.listdir(_dir(paths)))
    except FileNotFoundError:
        return False


def hold(paths: Paths, vm: registry.VM, qemu_pid: int) -> None:
    """Record the images QEMU (`qemu_pid`) has open read-write for `vm`, before it
    is saved: every regular file it holds for writing but its own logs. (The
    descriptors kvmgate passed are gone by now: QEMU keeps duplicates.)"""
    disks = []
    logs = vm.sub("log") + os.sep
    fd_dir = f"/proc/{qemu_pid}/fd"
    for n in sorted(os.listdir(fd_dir), key=int):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            target = os.readlink(os.path.join(fd_dir, n))
            flags = int(read_small(f"/proc/{qemu_pid}/fdinfo/{n}").split(b"flags:", 1)[1].split()[0], 8)
            if flags & os.O_ACCMODE == os.O_RDONLY or not target.startswith("/") or target.startswith(logs):
                continue
            fd = os.open(os.path.join(fd_dir, n), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    disks.append({"id": file_id(fd), "path": target})
            finally:
                os.close(fd)
    registry.mkdir_root(_dir(paths), 0o700)
    record = {"owner": vm.identity.owner, "name": vm.identity.name, "disks": disks}
    write_atomic(os.path.join(_dir(paths), f"{vm.key}.json"), json.dumps(record, sort_keys=True), fsync=True)


def release(paths: Paths, vm: registry.VM) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_dir(paths), f"{vm.key}.json"))
        fsync_dir(_dir(paths))


def _holds(paths: Paths, but: str) -> dict[str, tuple[str, str]]:
    """file id -> (owner, name) of the hibernated VM holding it, every VM's but `but`."""
    held: dict[str, tuple[str, str]] = {}
    for n in sorted(os.listdir(_dir(paths))):
        if not n.endswith(".json") or n == f"{but}.json":
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(read_small(os.path.join(_dir(paths), n)))
            for d in record["disks"]:
                held[str(d["id"])] = (str(record["owner"]), str(record["name"]))
    return held


def refuse_held(paths: Paths, vm: registry.VM, plan: Plan, fds: dict[int, int]) -> None:
    """Refuse to open read-write an image a hibernated VM holds (its own VM's
    hold is what a restore gives back)."""
    writable: Iterable[tuple[str, str, int]] = (
        (f"-{r.of}", r.path or "", fds[r.fd]) for r in plan.resources if r.kind == "disk" and r.writable
    )
    held = _holds(paths, vm.key)
    if not held:
        return  # no other VM is hibernated: no file handle to compute
    for option, path, fd in writable:
        holder = held.get(file_id(fd))
        if holder is None:
            continue
        whose = f"your hibernated VM {holder[1]}" if holder[0] == vm.identity.owner else "a hibernated VM"
        raise FileRefused(f"{option} {path}: held by {whose} until it is restored or its saved state is discarded")
