"""Root's small files on the state and runtime trees: written whole or not at all,
never through a link, and locks.

Every state file (pid, options, settings, saved-state records, the policy
cache, dnsmasq's hosts) goes through `write_atomic`: a crash or a relayed
signal leaves the old content or the new, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
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


def remove_tree(path: str) -> None:
    """Remove a directory tree someone else could write (the owner's directory on
    /run): iteratively, so no depth breaks it (shutil.rmtree recurses), and by
    descriptor with O_NOFOLLOW, so no link planted in it leads root elsewhere."""
    parent, name = os.path.split(path)
    try:
        top = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    stack: list[tuple[int, str]] = [(top, name)]  # (directory fd, entry in it) still to remove
    opened = [top]
    budget = 1 << 20  # entries: the owner may keep adding while root removes; root stops, not loops
    try:
        while stack and budget > 0:
            budget -= 1
            dfd, entry = stack[-1]
            try:
                try:
                    os.unlink(entry, dir_fd=dfd)
                except IsADirectoryError:
                    os.rmdir(entry, dir_fd=dfd)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    pass  # a directory with entries: descend below
                else:
                    stack.pop()  # gone meanwhile, or cannot be removed (a mount point): leave it
                    continue
            else:
                stack.pop()
                continue
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            sub = os.open(entry, flags, dir_fd=dfd)
            opened.append(sub)
            children = os.listdir(sub)
            if not children:
                continue  # emptied meanwhile: rmdir on the next turn
            stack.extend((sub, child) for child in children)
            if len(opened) > 4096:  # bound the descriptors held: close those whose entries are done
                live = {fd for fd, _ in stack}
                for fd in [f for f in opened if f not in live]:
                    os.close(fd)
                opened = [f for f in opened if f in live]
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


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
