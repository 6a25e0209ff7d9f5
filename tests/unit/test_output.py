"""host.output: root never writes to its caller itself. Each stream's writer is a
child that drops to the caller; root only writes into a private pipe, and never
waits. Run as root in the suite (the writers exist only while the helper is root).
Also verbs.console's tail finder."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.host import output
from kvmgate.verbs.console import _start_of_last_lines

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="writers exist while the helper is root")


@pytest.fixture(autouse=True)
def caller() -> Iterator[None]:
    output.set_caller(65534, 65534)
    output._writers.clear()
    yield
    for pid in output._writers:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    output._writers.clear()


def _uids(pid: int, want: set[int]) -> set[int]:
    """The process's uids, once they are `want` (the writer drops just after the fork)."""
    deadline = time.monotonic() + 5
    while True:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = {int(u) for u in next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]}
        if uids == want or time.monotonic() > deadline:
            return uids
        time.sleep(0.01)


@root_only
def test_the_writer_is_the_callers_process_and_delivers_everything() -> None:
    r, w = os.pipe()
    s = output.Sink(w)
    s.write("hello ")
    s.write(b"world\n")
    assert _uids(output._writers[0], {65534}) == {65534}, "the writer runs as the caller, not root"
    s.close_pipe()
    os.close(w)
    output.finish()
    assert os.read(r, 100) == b"hello world\n"
    os.close(r)


@root_only
def test_a_pipe_locked_by_splice_never_holds_root() -> None:
    """The attack: the caller holds their pipe's lock from another process with
    splice(2) from a socket that never sends. A write to that pipe sleeps
    uninterruptibly, and poll(2) still says there is room. Root never writes there."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    splicer = threading.Thread(target=lambda: _splice(a.fileno(), w), daemon=True)
    splicer.start()
    time.sleep(0.3)
    try:
        s = output.Sink(w)
        began = time.monotonic()
        s.write(b"x" * (4 << 20))  # more than the private pipe holds: the rest is dropped, marked
        s.close_pipe()
        output.EXIT_WAIT, saved = 0.5, output.EXIT_WAIT
        try:
            output.finish()
        finally:
            output.EXIT_WAIT = saved
        assert time.monotonic() - began < 3, "root went on"
        assert s.full
    finally:
        b.send(b"z")  # lets the splice (and the stuck writer) go
        splicer.join(5)
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _splice(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        os.splice(src, dst, 1)


@root_only
def test_a_stopped_terminal_and_a_full_socket_hold_only_the_writer() -> None:
    master, slave = pty.openpty()
    a, b = socket.socketpair()
    try:
        for fd in (slave, a.fileno()):
            s = output.Sink(fd)
            began = time.monotonic()
            s.write(b"y" * (8 << 20))
            s.close_pipe()
            assert time.monotonic() - began < 3
        output.EXIT_WAIT, saved = 0.5, output.EXIT_WAIT
        try:
            output.finish()
        finally:
            output.EXIT_WAIT = saved
        assert os.get_blocking(slave), "the caller's own description keeps its flags"
    finally:
        for fd in (master, slave):
            os.close(fd)
        a.close()
        b.close()


@root_only
def test_a_terminal_open_only_for_reading_is_never_written() -> None:
    master, slave = pty.openpty()
    ro = os.open(os.ttyname(slave), os.O_RDONLY | os.O_NOCTTY)
    try:
        s = output.Sink(ro)
        s.write(b"secret")
        s.close_pipe()
        output.finish()
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 100)
    finally:
        for fd in (ro, slave, master):
            os.close(fd)


def test_roots_own_output_is_written_directly() -> None:
    output.set_caller(0, 0)
    r, w = os.pipe()
    output.Sink(w).write(b"direct")
    assert not output._writers and os.read(r, 10) == b"direct"
    os.close(r)
    os.close(w)


@given(st.lists(st.sampled_from([b"a", b"\n", b"\r", b"bc"]), max_size=60), st.integers(0, 30))
def test_the_last_lines_are_those_split_on_newline(parts: list[bytes], n: int) -> None:
    data = b"".join(parts)
    f = io.BytesIO(data)
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
    if not data.endswith(b"\n") and data:
        lines.append(data.rsplit(b"\n", 1)[-1])
    want = b"".join(lines[-n:]) if n else b""
    assert data[_start_of_last_lines(f, len(data), n) :] == want
