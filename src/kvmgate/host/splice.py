"""Standard input and output joined to a socket, both ways, until either side
closes (`kvmgate tunnel`). Bounded in memory (one 64 KiB buffer each way) and in
nothing else: it lasts as long as the owner's connection."""

from __future__ import annotations

import os
import select
import socket


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def pump(sock: socket.socket) -> None:
    inputs: list[socket.socket | int] = [sock, 0]
    while inputs:
        ready, _, _ = select.select(inputs, [], [])
        if 0 in ready:
            data = os.read(0, 65536)
            if data:
                sock.sendall(data)
            else:
                inputs.remove(0)
                sock.shutdown(socket.SHUT_WR)
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            _write_all(1, data)
