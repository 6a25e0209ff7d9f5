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

`pause` is a test-only hook (store/pausepoints.py); in a normal installation
it returns at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from kvmgate.paths import pause_control

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
    control = pause_control()
    if control:
        from kvmgate.store import pausepoints  # only the suite's installation gets here

        pausepoints.wait(control, point)
