"""The QEMU guest agent, spoken to by the helper alone: it sets the guest's
clock after a thaw or a restore (the guest's clock stood still while its vCPUs
did, so it is behind by as long as the VM was frozen or hibernated).

The channel is the admin's choice (`admin create|set --guest-agent on`): a
virtio-serial port named org.qemu.guest_agent.0 whose host end is a root-only
socket in the VM's runtime directory. The guest needs qemu-guest-agent
running (Debian: the qemu-guest-agent package). The guest is not trusted:
every reply is bounded in size and time and strictly parsed, and a guest
without an agent, or one that lies, costs at most TIMEOUT and changes nothing
on the host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

SOCKET = "qga.sock"
TIMEOUT = 1.5  # seconds for the whole exchange
MAX_REPLY = 64 << 10
DELIMITER = b"\xff"  # guest-sync-delimited: the agent's reply starts after it


def set_time(rundir: str) -> bool:
    """Set the guest's clock to the host's. False if no agent answered."""
    path = os.path.join(rundir, SOCKET)
    deadline = time.monotonic() + TIMEOUT
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            token = int.from_bytes(os.urandom(4), "big") >> 1
            # Resynchronise first: anything a previous exchange or the guest left in
            # the channel is discarded up to the delimiter and our own token.
            s.sendall(DELIMITER + _request("guest-sync-delimited", {"id": token}))
            buf = _until(s, b"", deadline, lambda b: DELIMITER in b and b"\n" in b.rsplit(DELIMITER, 1)[1])
            line = buf.rsplit(DELIMITER, 1)[1].split(b"\n", 1)[0]
            if json.loads(line).get("return") != token:
                return False
            s.sendall(_request("guest-set-time", {"time": time.time_ns()}))
            reply = _until(s, b"", deadline, lambda b: b"\n" in b).split(b"\n", 1)[0]
            answer = json.loads(reply)
            return isinstance(answer, dict) and "return" in answer
    except (OSError, ValueError, AttributeError):
        return False


def _request(command: str, args: dict[str, object]) -> bytes:
    return json.dumps({"execute": command, "arguments": args}).encode() + b"\n"


def _until(s: socket.socket, buf: bytes, deadline: float, done: Callable[[bytes], bool]) -> bytes:
    while not done(buf):
        left = deadline - time.monotonic()
        if left <= 0 or len(buf) > MAX_REPLY:
            raise OSError("the guest agent did not answer in time")
        s.settimeout(left)
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("the guest agent channel closed")
        buf += chunk
    return buf
