"""Rotating the audit file, loaded only once it has passed its bound
(host.audit.MAX_LOG): the helper keeps the file's size itself, logrotate's
snippet is extra."""

from __future__ import annotations

import contextlib
import fcntl
import os


def rotate(path: str, max_log: int, generations: int) -> None:
    """audit.log -> audit.log.1 -> ... -> audit.log.<generations> (dropped), under a
    lock, and only if the file is still too big once the lock is held."""
    fd = os.open(path + ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.lstat(path).st_size <= max_log:
                return  # another writer rotated it
        except FileNotFoundError:
            return
        for n in range(generations - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{path}.{n}", f"{path}.{n + 1}")
        os.rename(path, f"{path}.1")
    finally:
        os.close(fd)
