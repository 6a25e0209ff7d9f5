"""Test-only pause points. The suite's own installation (install.sh
--test-pause-points bakes the control file's path in) stops at named points
while that root-owned file names them, so that tests can signal the helper
exactly there (tests/security/test_signals.py). A normal installation never
imports this module."""

from __future__ import annotations

import contextlib
import os
import time


def wait(control: str, point: str) -> None:
    """Wait at `point` while `control` (root's, not writable by others) names it."""
    try:
        st = os.lstat(control)
        with open(control) as f:
            wanted = f.read().split()
    except OSError:
        return
    if st.st_uid != 0 or st.st_mode & 0o022 or point not in wanted:
        return
    marker = f"{control}.at.{point}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with open(control) as f:
                    if point not in f.read().split():
                        return
            except OSError:
                return
            time.sleep(0.01)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(marker)
