"""A minimal synchronous QMP client for the privileged helper.

The project uses `qemu.qmp` wherever a full client fits (tests, benchmarks,
unprivileged daemons). The root helper only needs a handshake, a handful of
commands and SCM_RIGHTS fd passing; a small stdlib client keeps its imports
(asyncio alone costs more than the helper's whole start-up budget) and attack
surface down. Replies are size-limited and strictly parsed.
"""

from __future__ import annotations

import array
import json
import socket
import time
from typing import Any

from kvmgate.errors import QMPError

__all__ = ["QMP", "QMPError", "wait_ready"]

MAX_MESSAGE = 1 << 20


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        try:
            self.sock.connect(path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise QMPError("no QMP greeting")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_MESSAGE:
                raise QMPError("QMP message too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError("malformed QMP message") from None
        if not isinstance(msg, dict):
            raise QMPError("malformed QMP message")
        return msg

    def execute(self, command: str, args: dict[str, Any] | None = None, fds: list[int] | None = None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = args
        data = json.dumps(req).encode() + b"\n"
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(data)
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError(str(err.get("desc", "QMP error")), str(err.get("class", "")))
            if "return" in msg:
                return msg["return"]
            raise QMPError("unexpected QMP reply")


def wait_ready(path: str, deadline: float, alive: Any) -> dict[str, Any]:
    """Connect once QEMU answers; `alive()` returning False stops the wait early."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise QMPError("QEMU exited during start-up")
        try:
            with QMP(path, timeout=max(0.1, deadline - time.monotonic())) as q:
                status: dict[str, Any] = q.execute("query-status")
                return status
        except (OSError, QMPError) as err:
            last = err
            time.sleep(0.005)
    raise QMPError(f"QEMU did not answer QMP in time ({last})")
