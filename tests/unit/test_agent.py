"""The guest-agent exchange (host.agent) against a stand-in for the guest's
agent on a real unix socket: the protocol, and guests that lie, flood or stay
silent. The real agent in a real guest: tests/integration/test_debian_guest.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kvmgate.host import agent


def serve(tmp_path: Path, behave: Callable[[socket.socket], None]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / agent.SOCKET))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            behave(conn)
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def read_request(conn: socket.socket) -> dict:
    buf = b""
    while b"\n" not in buf:
        buf += conn.recv(4096)
    return json.loads(buf.split(b"\n")[0].lstrip(agent.DELIMITER))


def test_an_agent_sets_the_time(tmp_path: Path) -> None:
    seen: list[dict] = []

    def honest(conn: socket.socket) -> None:
        req = read_request(conn)
        seen.append(req)
        conn.sendall(
            b'{"return": 1}\n' + agent.DELIMITER + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
        )
        seen.append(read_request(conn))
        conn.sendall(b'{"return": {}}\n')

    t = serve(tmp_path, honest)
    assert agent.set_time(str(tmp_path))
    t.join(5)
    assert seen[0]["execute"] == "guest-sync-delimited" and seen[1]["execute"] == "guest-set-time"
    assert abs(seen[1]["arguments"]["time"] - time.time_ns()) < 5e9


def test_a_lying_agent_changes_nothing(tmp_path: Path) -> None:
    def liar(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(agent.DELIMITER + b'{"return": 12345}\n')
        time.sleep(0.5)

    t = serve(tmp_path, liar)
    assert not agent.set_time(str(tmp_path))
    t.join(5)


def test_a_silent_or_flooding_guest_costs_at_most_the_timeout(tmp_path: Path) -> None:
    def flood(conn: socket.socket) -> None:
        try:
            while True:
                conn.sendall(b"x" * 65536)
        except OSError:
            pass

    serve(tmp_path, flood)
    t0 = time.monotonic()
    assert not agent.set_time(str(tmp_path))
    assert time.monotonic() - t0 < agent.TIMEOUT + 0.5
    (tmp_path / agent.SOCKET).unlink()

    serve(tmp_path, lambda conn: time.sleep(3))
    t0 = time.monotonic()
    assert not agent.set_time(str(tmp_path))
    assert time.monotonic() - t0 < agent.TIMEOUT + 0.5


def test_no_channel_costs_nothing(tmp_path: Path) -> None:
    t0 = time.monotonic()
    assert not agent.set_time(str(tmp_path))
    assert time.monotonic() - t0 < 0.1
