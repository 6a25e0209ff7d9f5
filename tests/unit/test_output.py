"""host.output: root's writes to its caller never block, and never while a lock is held;
verbs.console's tail finder. Run as root in the suite (the deadline applies to root only)."""

from __future__ import annotations

import io
import os
import pty
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.host import output
from kvmgate.store import critical
from kvmgate.verbs.console import _start_of_last_lines

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the deadline applies while the helper is root")


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    output._left[0] = 0.5
    yield
    output._left[0] = output.DEADLINE


def sink(fd: int) -> output.Sink:
    return output.Sink(fd)


@root_only
def test_a_full_pipe_nobody_reads_costs_the_deadline_and_no_more() -> None:
    r, w = os.pipe()
    try:
        s = sink(w)
        start = time.monotonic()
        s.write(b"x" * (4 << 20))  # far more than a pipe holds
        assert time.monotonic() - start < 5
        assert s.gone
        s.write(b"later")  # dropped at once
        assert time.monotonic() - start < 5
    finally:
        os.close(r)
        os.close(w)


@root_only
def test_a_full_socket_and_a_stopped_terminal_do_not_block_either() -> None:
    a, b = socket.socketpair()
    master, slave = pty.openpty()
    try:
        for fd in (a.fileno(), slave):
            s = sink(fd)
            start = time.monotonic()
            s.write(b"y" * (8 << 20))
            assert time.monotonic() - start < 5 and s.gone
        # the caller's own description was left blocking
        assert os.get_blocking(slave)
    finally:
        a.close()
        b.close()
        os.close(master)
        os.close(slave)


def test_nothing_is_written_while_a_lock_is_held_and_all_of_it_after() -> None:
    r, w = os.pipe()
    try:
        s = sink(w)
        with critical.section():
            s.write(b"one\n")
            s.flush()
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 100)
        s.flush()  # what critical.on_release does
        assert os.read(r, 100) == b"one\n"
    finally:
        os.close(r)
        os.close(w)


def test_kept_output_is_bounded() -> None:
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    try:
        output.trust_caller()
        s = output.Sink(w)
        with critical.section():
            for _ in range(5):
                s.write(b"z" * (1 << 20))
        s.flush()
    finally:
        os.close(w)
        t.join()
        os.close(r)
    assert len(got) <= output.PENDING_MAX + 100
    assert got.endswith(b"[kvmgate: output truncated]\n")


@root_only
def test_a_terminal_open_only_for_reading_is_never_written() -> None:
    master, slave = pty.openpty()
    ro = os.open(os.ttyname(slave), os.O_RDONLY | os.O_NOCTTY)
    try:
        s = sink(ro)
        s.write(b"secret")
        assert s.gone
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 100)
    finally:
        for fd in (ro, slave, master):
            os.close(fd)


@given(st.lists(st.sampled_from([b"a", b"\n", b"\r", b"bc"]), max_size=60), st.integers(0, 30))
def test_the_last_lines_are_those_split_on_newline(parts: list[bytes], n: int) -> None:
    data = b"".join(parts)
    f = io.BytesIO(data)
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
    if not data.endswith(b"\n") and data:
        lines.append(data.rsplit(b"\n", 1)[-1])
    want = b"".join(lines[-n:]) if n else b""
    assert data[_start_of_last_lines(f, len(data), n) :] == want
