"""Root never writes to its caller itself.

The helper's stdout and stderr are the caller's own descriptors (sudoers:
!use_pty): a pipe they never read, a terminal they stopped with Ctrl-S, a file
on a mount that never answers, or a pipe whose lock they hold from another
process with splice(2), where a write sleeps uninterruptibly (even SIGKILL waits)
with no poll(2) able to see it coming. Any write by root to such a descriptor
can hold a root process for as long as the caller likes, and a helper that
holds a VM's lock would hold it with it.

So, unless the caller is root, each stream gets a writer: a child forked at the
first write, which closes every other descriptor, drops to the caller's uid and
gid (no groups, nothing else) and copies a private pipe to the caller's
descriptor, waiting as long as the caller makes it wait: it is the caller's own
process then, theirs to kill, counted in their limits. Root writes only into the
private pipe (1 MiB, non-blocking), which nobody else can reach: it never
waits, holding a lock or not (hibernate's progress too). What does not fit is
dropped, with a marker. At exit the helper closes the pipes and waits at most
EXIT_WAIT seconds for its writers, so that output comes before the shell prompt;
then it exits, whatever they do.

Once the helper itself has dropped to the caller (console, log), it writes
directly: those writes are the caller's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time

EXIT_WAIT = 5.0  # seconds the helper waits at exit for its writers
PIPE_SIZE = 1 << 20
TRUNCATED = b"\n[kvmgate: output truncated]\n"
NOBODY = 65534
_caller = [NOBODY, NOBODY, False]  # uid, gid, trusted (root: write directly)
_writers: list[int] = []  # pids


class Sink:
    """sys.stdout, sys.stderr (and their .buffer): text or bytes to one of the
    caller's descriptors, as the module docstring says."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = self
        self.pipe: int | None = None
        self.full = False

    def write(self, data: str | bytes) -> int:
        raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else bytes(data)
        if os.geteuid() != 0 or _caller[2]:
            _write_all(self.fd, raw)  # the caller's own process now, or root's own caller
        elif raw and not self.full:
            if self.pipe is None:
                self.pipe = _writer(self.fd)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(self.pipe, view) :]
            except BlockingIOError:
                self.full = True
                with contextlib.suppress(OSError):
                    os.write(self.pipe, TRUNCATED)
            except OSError:
                self.full = True  # the writer is gone (the reader left)
        return len(data)

    def flush(self) -> None:
        pass  # nothing is kept: every write went to the caller or into the pipe

    def close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None


def _writer(fd: int) -> int:
    """Fork the writer for `fd`; returns the write end of its private pipe."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    pid = os.fork()
    if pid == 0:  # the writer: nothing of root's survives into it
        try:
            for sig in range(1, signal.NSIG):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
            os.dup2(fd, 1)
            os.dup2(r, 0)
            os.closerange(2, 1 << 20)
            os.setgroups([])
            os.setresgid(_caller[1], _caller[1], _caller[1])
            os.setresuid(_caller[0], _caller[0], _caller[0])
            while chunk := os.read(0, 1 << 16):
                _write_all(1, chunk)
        finally:
            os._exit(0)
    os.close(r)
    os.set_blocking(w, False)
    _writers.append(pid)
    return w


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a description the caller made non-blocking
            import select

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


def set_caller(uid: int, gid: int) -> None:
    """Whose process the writers become; root's own output is written directly."""
    _caller[:] = [uid, gid, uid == 0]


def finish() -> None:
    """Close the writers' pipes and give them EXIT_WAIT seconds to be done."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, Sink):
            stream.close_pipe()
    deadline = time.monotonic() + EXIT_WAIT
    for pid in _writers:
        pause = 0.0002  # a writer is usually done at once: look again soon, then less often
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
                    continue
            break
