"""The console log as a ring bounded at write time.

QEMU writes the guest's serial output into a pipe; a small pump (kvmgate.pump),
running as the owner in the VM's cgroup, appends it to `log/console.log`. When
the file passes its bound, the pump keeps:
- the head: the first HEAD bytes of this run (the boot, and whatever came
  before a flood),
- a marker line that says how much was dropped,
- the tail: the newest output, half the bound.
So a guest that prints without end can neither grow the file past its bound nor
erase how the run began. A fresh start moves the last run's log to
`console.prev.log`; a restore continues the same run's log. Pure: sizes and
text only.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_MIB = 8
MARKER = b"\r\n[kvmgate: %d bytes of console output dropped here]\r\n"
MARKER_MAX = len(MARKER % (1 << 62))


class Ring(NamedTuple):
    limit: int  # the file never grows past limit + one pipe read

    @property
    def head(self) -> int:
        return self.limit // 8

    @property
    def keep(self) -> int:
        return self.limit // 2

    def compact(self, size: int) -> tuple[int, int] | None:
        """For a file of `size` bytes: None while it is within the bound, else
        (where the kept tail starts, how many bytes are dropped)."""
        if size <= self.limit:
            return None
        start = size - self.keep
        return start, start - self.head

    def reader_resume(self, size: int) -> int:
        """Where a reader that was past the end of a compacted file goes on: the marker."""
        return min(self.head, size)


def marker(dropped: int) -> bytes:
    return MARKER % dropped
