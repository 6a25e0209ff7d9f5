"""Root's small files on the state and runtime trees: written whole or not at all,
never through a link, and locks.

Every state file (pid, options, settings, saved-state records, the policy
cache, dnsmasq's hosts) goes through `write_atomic`: a crash or a relayed
signal leaves the old content or the new, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from kvmgate.errors import Busy
from kvmgate.model.qcow2 import EmptyImage
from kvmgate.store import critical

NOFOLLOW_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: str, data: str | bytes, mode: int = 0o600, fsync: bool = False) -> None:
    """Write `path` through a temporary file in the same directory and rename it
    into place. The temporary name is private to this process, so two writers
    never share one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, NOFOLLOW_CREATE, mode)
    try:
        _write_all(fd, data.encode() if isinstance(data, str) else data)
        os.fchmod(fd, mode)  # the helper's umask is 077; some files are for others to read
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(os.path.dirname(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_image(fd: int, image: EmptyImage) -> None:
    """An empty image: its head, then the file extended (sparse) to its length."""
    _write_all(fd, image.head)
    os.ftruncate(fd, image.length)


def read_small(path: str, limit: int = 1 << 20) -> bytes:
    """A root-made file, never through a link, at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def touch(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))


def remove_tree(path: str, budget: int = 1 << 20) -> bool:
    """Remove a tree someone else could write (a VM's disks, the owner's directory
    on /run). Whatever its depth, with at most three descriptors: a directory
    that is not empty has its subdirectories moved up to the top of the tree
    (renames by descriptor, never following a link), so nothing recurses and
    nothing is opened deeper than one level. Stops after `budget` entries (the
    owner may keep adding while root removes): returns False, and a later call
    (`admin reap`) goes on where this one stopped."""
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if _remove_entry(pfd, name):
            return True
        try:
            top = os.open(name, flags, dir_fd=pfd)
        except (FileNotFoundError, NotADirectoryError):
            return True
        try:
            moved = 0
            while budget > 0:
                children = os.listdir(top)
                if not children:
                    break
                for child in children:
                    budget -= 1
                    if _remove_entry(top, child):
                        continue
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
                        sub = os.open(child, flags, dir_fd=top)
                        try:
                            for entry in os.listdir(sub):
                                budget -= 1
                                if not _remove_entry(sub, entry):  # a directory with entries: move it up
                                    moved += 1
                                    with contextlib.suppress(OSError):
                                        os.rename(entry, f".kvmgate-rm-{moved}", src_dir_fd=sub, dst_dir_fd=top)
                        finally:
                            os.close(sub)
                        _remove_entry(top, child)
            return _remove_entry(pfd, name)
        finally:
            os.close(top)
    finally:
        os.close(pfd)


def _remove_entry(dfd: int, name: str) -> bool:
    """unlink or rmdir `name` in `dfd`; True if it is gone, False if it is a
    directory that still has entries (or cannot be removed)."""
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        pass
    except OSError:
        return False
    try:
        os.rmdir(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def flock(path: str, timeout: float | None = None, what: str = "") -> Iterator[int]:
    """An exclusive lock on `path` (created root-only). With a timeout, give up
    with Busy instead of waiting for ever behind a stuck holder."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(f"{what or os.path.basename(path)} is busy with another operation") from None
                    time.sleep(0.02)
        with critical.section():
            yield fd
    finally:
        os.close(fd)
