"""kvmgate's console pump: QEMU's serial output, from a pipe, into the VM's
console log, bounded at write time (model.consolelog.Ring).

Started by the helper in the child that becomes QEMU, after it dropped to the
owner's uid and was placed in the VM's cgroup: the pump runs as the owner,
without capabilities, and its memory (a pipe read, a 1 MiB copy buffer) counts
against the VM's. Its descriptors: 0, the pipe's read end; 3, the log (opened
by root, the log directory is root's); 1 and 2, QEMU's qemu.log, for its own
errors. It exits when QEMU closes the pipe.

    python3 -I -S kvmgate/pump.py LIMIT_BYTES
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys

from kvmgate.model.consolelog import Ring, marker

LOG_FD = 3
READ = 65536
CHUNK = 1 << 20  # compaction copies the tail forward in pieces: the pump's memory stays small


class Pump:
    """The log's state: how much guest output was dropped in all, and how long
    the marker that says so is (it is rewritten at each compaction)."""

    def __init__(self, ring: Ring, fd: int) -> None:
        self.ring, self.fd = ring, fd
        self.dropped = 0
        self.marker_len = 0
        self.size = os.fstat(fd).st_size

    def compact(self) -> None:
        """Keep the head and the newest half, the marker between them."""
        size = os.fstat(self.fd).st_size
        cut = self.ring.compact(size)
        if cut is None:
            self.size = size
            return
        start, dropped = cut
        line = os.pread(self.fd, 4096, start).find(b"\n")
        if line >= 0:  # start the kept tail at a line
            start, dropped = start + line + 1, dropped + line + 1
        self.dropped += max(0, dropped - self.marker_len)  # the old marker is not the guest's
        mark = marker(self.dropped)
        os.pwrite(self.fd, mark, self.ring.head)
        dst = self.ring.head + len(mark)
        while start < size:  # forward: the destination is always before the source
            chunk = os.pread(self.fd, min(CHUNK, size - start), start)
            if not chunk:
                break
            os.pwrite(self.fd, chunk, dst)
            start, dst = start + len(chunk), dst + len(chunk)
        os.ftruncate(self.fd, dst)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.marker_len, self.size = len(mark), dst

    def run(self, src: int) -> None:
        while data := os.read(src, READ):
            try:
                _write(self.fd, data)
                self.size += len(data)
            except OSError:  # a full disk: drop output, never block QEMU
                self.size = os.fstat(self.fd).st_size
            if self.size > self.ring.limit:
                with contextlib.suppress(OSError):
                    self.compact()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    # The pump is the log's only writer: plain writes at the end, and pwrite for
    # compaction (on an O_APPEND file Linux would append every pwrite).
    fcntl.fcntl(LOG_FD, fcntl.F_SETFL, fcntl.fcntl(LOG_FD, fcntl.F_GETFL) & ~os.O_APPEND)
    os.lseek(LOG_FD, 0, os.SEEK_END)
    Pump(Ring(int(argv[0])), LOG_FD).run(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
