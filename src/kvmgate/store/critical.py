"""Relayed signals never cut root's work in half.

A user can signal their own sudo, and sudo passes most signals on to the
helper; a terminal sends SIGINT, SIGQUIT and SIGHUP to the whole foreground
group. With default dispositions the helper would die wherever it was: between
spawning QEMU and recording its pid, half-way through a hibernate, between
stopping and restarting dnsmasq.

So the helper catches every such signal for its whole life (`install`). While
it holds nothing shared (waiting for a lock, attached to a console, polling a
stopping VM), a signal interrupts it at once (KeyboardInterrupt: exit 130,
nothing half-done because nothing was begun). While it holds a lock (every
`files.flock`, which every operation and every shared allocation goes through),
the signal is only noted: the operation finishes, or rolls back through its own
error path, and reports its real outcome. Loops over many VMs call `checkpoint`
between VMs, so a deferred SIGTERM stops them at the next boundary.

Handlers, unlike blocked masks, are reset by exec: QEMU, dnsmasq, ip and nft
start with default dispositions.

`pause` is a test-only hook: the suite's own installation (install.sh
--test-pause-points bakes the flag in) stops at named points while a root-owned
control file names them, so that tests can signal the helper exactly there.
A normal installation has no flag, and the function returns at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

RELAYED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)

_depth = 0
_pending: list[int] = []
_actions: dict[int, Callable[[], None]] = {}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _depth:
        _pending.append(signum)
        return
    action = _actions.get(signum)
    if action is None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    action()


def install() -> None:
    for sig in RELAYED:
        signal.signal(sig, _on_signal)


def act_on(sig: int, action: Callable[[], None]) -> None:
    """Run `action` for `sig` instead of interrupting (only ever outside a
    section: one deferred inside it is the caller's to look for in `deferred`)."""
    _actions[sig] = action


@contextlib.contextmanager
def section() -> Iterator[None]:
    """Root holds something shared: relayed signals wait until it is let go."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def deferred() -> list[int]:
    return list(_pending)


def checkpoint() -> None:
    """Between units of work (VMs in a loop): stop here if a signal was deferred."""
    if _pending and not _depth:
        raise KeyboardInterrupt(signal.Signals(_pending[0]).name)


def pause(point: str) -> None:
    """Test-only: wait at `point` while the suite's control file names it."""
    try:
        from kvmgate import _install  # type: ignore[attr-defined]
    except ImportError:
        return
    control = getattr(_install, "PAUSE_CONTROL", None)
    if not control:
        return
    try:
        st = os.lstat(control)
        with open(control) as f:
            wanted = f.read().split()
    except OSError:
        return
    if st.st_uid != 0 or st.st_mode & 0o022 or point not in wanted:
        return
    marker = f"{control}.at.{point}"
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
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
