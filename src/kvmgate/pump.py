"""kvmgate's console pump: QEMU's serial output, from a pipe, into the VM's
console log, bounded at write time (model.consolelog.Ring).

Started by the helper in the child that becomes QEMU, after it dropped to the
owner's uid and was placed in the VM's cgroup: the pump runs as the owner,
without capabilities, and its memory counts against the VM's. It gets exactly
two descriptors: 0, the pipe's read end, and 3, the log (opened by root, the
log directory is root's). It exits when QEMU closes the pipe.

    python3 -I -S kvmgate/pump.py LIMIT_BYTES
"""

from __future__ import annotations

import os
import sys

from kvmgate.model.consolelog import Ring, marker

LOG_FD = 3
READ = 65536


def compact(ring: Ring, fd: int) -> None:
    """Keep the head and the newest half, with a marker between; memory: the tail."""
    size = os.fstat(fd).st_size
    cut = ring.compact(size)
    if cut is None:
        return
    start, dropped = cut
    tail = os.pread(fd, size - start, start)
    nl = tail.find(b"\n")
    if 0 <= nl < 4096:  # start the kept tail at a line
        tail, dropped = tail[nl + 1 :], dropped + nl + 1
    os.ftruncate(fd, ring.head)
    os.lseek(fd, 0, os.SEEK_END)
    _write(fd, marker(dropped) + tail)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pump(ring: Ring, src: int, log: int) -> None:
    size = os.fstat(log).st_size
    while data := os.read(src, READ):
        try:
            _write(log, data)
        except OSError:
            continue  # a full disk or a file size limit: drop output, never block QEMU
        size += len(data)
        if size > ring.limit:
            compact(ring, log)
            size = os.fstat(log).st_size


def main(argv: list[str]) -> int:
    ring = Ring(int(argv[0]))
    os.lseek(LOG_FD, 0, os.SEEK_END)
    pump(ring, 0, LOG_FD)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
