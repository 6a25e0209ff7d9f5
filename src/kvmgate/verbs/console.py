"""`kvmgate console`: the serial console, for the VM's owner.

Output is read from the console log, which QEMU writes whether or not anyone is
attached: one ordered stream, so the scrollback and the live part neither overlap
nor leave a gap. The socket carries the keyboard to the guest; what QEMU also
sends over it is drained and dropped. One attachment at a time (a lock); a second
one is refused with exit 5. The socket and log are opened as root; the relay
itself then runs as the caller. Detach with Ctrl-].

The guest's output reaches its owner as it is. Anyone else (root with --owner)
sees control sequences made visible (model.terminal), so a guest can never drive
an administrator's terminal (its clipboard, its title, answers typed into its
shell).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import select
import socket
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

from kvmgate.errors import UsageError, WrongState
from kvmgate.host.caller import Caller, drop_to
from kvmgate.model.commands import Request
from kvmgate.model.consolelog import Ring
from kvmgate.model.terminal import Visible
from kvmgate.paths import Paths
from kvmgate.store import config, note, runtime
from kvmgate.verbs.common import emit, target

DETACH = b"\x1d"  # Ctrl-]
LOG_READ_MAX = 1100 << 20  # above the largest ring the policy allows (1 GiB): never unbounded
SCROLLBACK = 16384
POLL = 0.02
FOLLOW_POLL = 0.2
QUIET = 1.0  # after the end of piped input, detach once the guest has been quiet this long


LINES_MAX = 1_000_000


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "log":
        return history(req, who, paths)
    expect = req.flag("--expect")
    t = req.flag("--timeout")
    if t is not None and not (t.isascii() and t.isdigit() and len(t) <= 6 and int(t) <= 86400):
        raise UsageError("--timeout must be whole seconds")
    pattern = None
    if expect is not None:
        try:
            pattern = re.compile(expect.encode())
        except (re.error, OverflowError, RecursionError) as err:  # ("a{4294967296}", deep nesting)
            raise UsageError(f"--expect: {err}") from None
    vm = target(req, who, paths)  # after the arguments are checked: usage errors first
    from kvmgate.ops import relay as on_node

    if (code := on_node.route(req, who, paths, vm)) is not None:  # the Slurm backend: on the VM's node
        return code
    if not runtime.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    lock = os.open(
        os.path.join(vm.rundir, "console.lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WrongState(f"{vm.identity.name}: the console is already attached elsewhere") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.path.join(vm.rundir, "console.sock"))
        log = open(vm.sub("log", "console.log"), "rb")  # noqa: SIM115 - lives as long as the relay
    except OSError:
        raise WrongState(f"{vm.identity.name} has no serial console") from None
    if who.name == vm.identity.owner:
        note.mark_used(vm)  # the memory budget's "least recently used"
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - SCROLLBACK))
    shown = None if who.name == vm.identity.owner else Visible()
    resume = Ring(config.load(paths).console_log_mib << 20).head  # where a compacted log goes on
    if not who.is_root:
        pw = pwd.getpwuid(who.uid)
        drop_to(pw.pw_uid, pw.pw_gid)
    deadline = time.monotonic() + float(t) if t is not None else None
    return relay(sock, log, pattern, deadline, shown, resume)


def relay(
    sock: socket.socket,
    log: BinaryIO,
    pattern: re.Pattern[bytes] | None,
    deadline: float | None,
    shown: Visible | None = None,
    resume: int = 0,
) -> int:
    """Copy the log to stdout (through `shown` for a viewer who is not the owner)
    and the keyboard to the guest, until detached, matched or timed out."""
    out = sys.stdout.buffer
    interactive = pattern is None and os.isatty(0)
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(0)
        tty.setraw(0)
        sys.stderr.write("[kvmgate: attached; detach with Ctrl-]]\r\n")
    seen = b""
    watch: list[socket.socket | int] = [sock, 0]
    ended_input: float | None = None  # when stdin reached its end (a pipe or a file)
    last_output = time.monotonic()
    try:
        while True:
            data = log.read(65536)
            size = os.fstat(log.fileno()).st_size
            if not data and size < log.tell():
                # The pump compacted the log (head, marker, newest output): go on at the
                # marker. A log an old release's QEMU wrote was emptied: from the start.
                log.seek(resume if resume < size else 0)
                continue
            if data:
                last_output = time.monotonic()
                out.write(data if shown is None else shown.feed(data))
                out.flush()
                if pattern is not None:
                    seen = (seen + data)[-65536:]
                    if pattern.search(seen):
                        return 0
                continue
            if (
                ended_input is not None
                and pattern is None
                and deadline is None
                and time.monotonic() - last_output > QUIET
            ):
                return 0  # input ended and the guest has answered (quiet since): detach
            wait = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if wait <= 0:
                if pattern is not None:
                    raise WrongState("console: timed out waiting for the expected output")
                return 0
            ready, _, _ = select.select(watch, [], [], wait)
            if sock in ready and not sock.recv(65536):
                return 0  # QEMU went away
            if 0 in ready:
                keys = os.read(0, 4096)
                if not keys:
                    watch.remove(0)
                    ended_input = last_output = time.monotonic()
                    continue
                if interactive and DETACH in keys:
                    sock.sendall(keys.split(DETACH, 1)[0])
                    return 0
                sock.sendall(keys)
    except BrokenPipeError:
        return 0
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\n[kvmgate: detached]\n")


def history(req: Request, who: Caller, paths: Paths) -> int:
    """`kvmgate log`: the console log of the current (or last) run, or of the one
    before it, with control sequences made visible unless --raw.

    Root only opens it (the log directory is root's); the helper then drops to
    the caller and reads and writes as them, so a caller who reads slowly, or
    not at all, holds up only their own process. Memory stays at one chunk,
    whatever the log's size (the ring's bound, up to 1 GiB), except for --json,
    whose one object is built in the caller's own process."""
    n = req.flag("--lines")
    if n is not None and not (n.isascii() and n.isdigit() and len(n) <= 7 and int(n) <= LINES_MAX):
        raise UsageError(f"--lines must be a whole number up to {LINES_MAX}")
    follow = req.has("--follow")
    if follow and (req.as_json or req.has("--previous")):
        raise UsageError("--follow takes neither --json nor --previous")
    vm = target(req, who, paths)
    name = "console.prev.log" if req.has("--previous") else "console.log"
    try:
        fd = os.open(vm.sub("log", name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    alive = None  # QEMU's liveness lock, opened as root: while QEMU holds it, there is more to follow
    if follow:
        with contextlib.suppress(FileNotFoundError):
            alive = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        resume = Ring(config.load(paths).console_log_mib << 20).head
    if not who.is_root:
        pw = pwd.getpwuid(who.uid)
        drop_to(pw.pw_uid, pw.pw_gid)
    with os.fdopen(fd, "rb") as f:
        end = min(os.fstat(fd).st_size, LOG_READ_MAX)
        begin = 0 if n is None else _start_of_last_lines(f, end, int(n))
        f.seek(begin)
        shown = None if req.has("--raw") else Visible()
        if req.as_json:
            text = b"".join(_chunks(f, end - begin, shown))
            emit({"name": vm.identity.name, "log": "previous" if req.has("--previous") else "current",
                  "text": text.decode(errors="replace")}, "", True)  # fmt: skip
            return 0
        try:
            for chunk in _chunks(f, end - begin, shown):
                sys.stdout.buffer.write(chunk)
            if alive is not None:
                _follow(f, alive, shown, resume)
            sys.stdout.flush()
        except BrokenPipeError:
            pass  # the reader went away (`kvmgate log vm | head`): nothing more to say to it
    return 0


def _follow(f: BinaryIO, alive: int, shown: Visible | None, resume: int) -> None:
    """Like `tail -f`, until QEMU lets go of its liveness lock (the VM stopped)."""
    while True:
        data = f.read(CHUNK)
        if data:
            sys.stdout.buffer.write(data if shown is None else shown.feed(data))
            continue
        size = os.fstat(f.fileno()).st_size
        if size < f.tell():  # the pump compacted the log: go on at its marker
            f.seek(resume if resume < size else 0)
            continue
        try:
            fcntl.flock(alive, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # QEMU is gone: what it wrote has been shown
        except BlockingIOError:
            time.sleep(FOLLOW_POLL)


CHUNK = 1 << 16


def _chunks(f: BinaryIO, length: int, shown: Visible | None) -> Iterator[bytes]:
    while length > 0:
        data = f.read(min(CHUNK, length))
        if not data:
            break
        length -= len(data)
        yield data if shown is None else shown.feed(data, final=length <= 0)
    if shown is not None and length > 0:
        yield shown.feed(b"", final=True)


def _start_of_last_lines(f: BinaryIO, end: int, n: int) -> int:
    """Where the last n lines before `end` begin (a last line without its
    newline counts), reading backwards a chunk at a time."""
    if n == 0:
        return end
    pos, newlines = end, 0
    if end:
        f.seek(end - 1)
        newlines = -1 if f.read(1) == b"\n" else 0  # the newline ending the last line starts nothing
    while pos > 0:
        step = min(CHUNK, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        i = len(data)
        while True:
            i = data.rfind(b"\n", 0, i)
            if i < 0:
                break
            newlines += 1
            if newlines == n:
                return pos + i + 1
    return 0
