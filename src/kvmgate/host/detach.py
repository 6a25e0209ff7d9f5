"""Root work that the caller need not wait for, in a detached grandchild.

Why: a login must not wait for the logon worker (pam_exec waits for the hook),
and a restore must not wait for the kernel to free a saved state of gigabytes
(unlinking 1 GiB of cached pages costs about 0.2 s). The grandchild belongs to
init, in its own session, with /dev/null for 0-2: nothing the caller holds (its
terminal, the pipe sudo or the front end reads) waits for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def detach(work: Callable[[], object]) -> None:
    """Run `work` in a detached grandchild; return as soon as it is on its own."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)  # it exits at once, leaving the grandchild to init
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        work()
    finally:
        os._exit(0)
