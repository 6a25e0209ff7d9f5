"""Root's output to its caller never waits on the caller.

The helper's stdout and stderr are the caller's own descriptors (sudoers:
!use_pty): a pipe they never read, a terminal they stopped with Ctrl-S, a
socket. A plain write blocks once it is full, and a helper blocked while it
holds a VM's lock would hold it for ever: every later operation on that VM,
each logon worker included, would wait behind it.

So, for as long as the helper is root:
- Nothing is written while it holds anything (`critical.held()`): the text is
  kept, up to PENDING_MAX bytes, and written once the lock is let go.
- No write waits longer than DEADLINE seconds in all. A pipe or socket gets
  at most PIPE_BUF bytes at a time, and only once poll says there is room (a
  pipe then has a free buffer, a socket's send buffer is at most a quarter
  full: such a write does not block). A terminal is written through a
  non-blocking open file description of its own (the caller's keeps its
  flags). Past the deadline, or once the reader has left, the rest is dropped:
  what the helper did is done either way, and its exit code still says how it
  went.
- A regular file or a device other than a terminal is written plainly: no
  reader can hold it up.

Once the helper has dropped to the caller's uid (console, log), its writes are
the caller's own and may wait as long as the caller likes.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
import time

from kvmgate.store import critical

DEADLINE = 30.0  # seconds, for all of one helper's output to a caller that is not root
PENDING_MAX = 4 << 20  # bytes kept while a lock is held
TRUNCATED = b"\n[kvmgate: output truncated]\n"
_left = [DEADLINE]  # shared by stdout and stderr


class Sink:
    """sys.stdout, sys.stderr (and their .buffer): text or bytes to one of the
    caller's descriptors, as the module docstring says."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = self
        self.pending = bytearray()
        self.gone = False
        self.own: int | None = None

    def write(self, data: str | bytes) -> int:
        raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else bytes(data)
        room = PENDING_MAX - len(self.pending)
        if not self.gone and room >= 0 and raw:
            self.pending += raw if len(raw) <= room else raw[: max(room - len(TRUNCATED), 0)] + TRUNCATED
        if not critical.held():
            self.flush()
        return len(data)

    def flush(self) -> None:
        if critical.held() or self.gone or not self.pending:
            return
        data = bytes(self.pending)
        self.pending.clear()
        if os.geteuid() != 0 or _left[0] == float("inf"):
            _write_all(self.fd, data)  # the caller's own process now, or root's: it may wait
            return
        try:
            self._timed(data)
        except OSError:
            self.gone = True  # the reader left, does not read, or the file is full: the rest is dropped

    def _timed(self, data: bytes) -> None:
        mode, fd = os.fstat(self.fd).st_mode, self.fd
        if stat.S_ISCHR(mode) and os.isatty(fd):
            fd = self._own_description()
        elif not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            _write_all(fd, data)  # a file, or a device that is not a terminal: no reader holds it up
            return
        view = memoryview(data)
        while view:
            p = select.poll()
            p.register(fd, select.POLLOUT)
            began = time.monotonic()
            ready = p.poll(max(_left[0], 0) * 1000)
            _left[0] -= time.monotonic() - began
            if not ready or any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in ready):
                raise TimeoutError("the caller does not read, or left")
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(fd, view[: select.PIPE_BUF]) :]

    def _own_description(self) -> int:
        """The caller's terminal opened anew, non-blocking, and only if the caller's
        descriptor is open for writing (never a write through one opened for reading)."""
        if self.own is None:
            import fcntl

            if fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
                raise PermissionError("not open for writing")
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            self.own = os.open(f"/proc/self/fd/{self.fd}", flags)
        return self.own


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a description the caller made non-blocking
            select.select([], [fd], [])


def install() -> None:
    """Route sys.stdout and sys.stderr through sinks. fds 0-2 are made to exist
    first (on /dev/null): a file root opens next must never become the
    descriptor its output goes to."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(null := os.open("/dev/null", os.O_RDWR), fd)
            if null != fd:
                os.close(null)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.stdout, sys.stderr = Sink(1), Sink(2)
    critical.on_release(flush)


def trust_caller() -> None:
    """Root called: root's own output may wait on root."""
    _left[0] = float("inf")


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
