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


def taken(path: str, shared: bool = False) -> bool:
    """Does another open file holding a flock on `path` keep this one from taking
    it (exclusively, or shared)? A file that does not exist is not taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
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
            try:
                critical.pause("lock:" + os.path.basename(path))  # tests: a caller must not stop root here
                yield fd
            finally:
                fcntl.flock(
                    fd, fcntl.LOCK_UN
                )  # explicitly: a child forked meanwhile (a writer, QEMU before exec) shares fd
    finally:
        os.close(fd)
