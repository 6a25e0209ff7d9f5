"""The console pump: the log stays within its bound however much the guest
writes, keeps how the run began, says how much it dropped in all, and ends
with the newest output."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from kvmgate.model.consolelog import Ring
from kvmgate.pump import Pump


def _run(ring: Ring, log: Path, chunks: list[bytes]) -> Pump:
    r, w = os.pipe()
    fd = os.open(log, os.O_RDWR | os.O_CREAT, 0o600)
    pump = Pump(ring, fd)
    t = threading.Thread(target=pump.run, args=(r,))
    t.start()
    for c in chunks:
        os.write(w, c)
    os.close(w)
    t.join(30)
    os.close(r)
    os.close(fd)
    return pump


def test_a_flood_stays_within_the_bound_and_keeps_the_beginning(tmp_path: Path) -> None:
    ring = Ring(256 << 10)
    log = tmp_path / "console.log"
    head = b"KVMGATE-GUEST-READY boot line\r\n"
    lines = [b"line %07d flood flood flood\n" % i for i in range(100_000)]
    flood = b"".join(lines)
    _run(ring, log, [head, flood[: len(flood) // 2], flood[len(flood) // 2 :], b"AFTER-42\n"])
    data = log.read_bytes()
    assert len(data) <= ring.limit + 65536
    assert data.startswith(head)
    markers = re.findall(rb"\[kvmgate: (\d+) bytes of console output dropped here\]", data)
    assert len(markers) == 1, "one marker: each compaction rewrites it"
    kept = data[ring.head :].split(b"dropped here]\r\n", 1)[1]
    assert data.endswith(b"AFTER-42\n")
    guest_total = len(head) + len(flood) + len(b"AFTER-42\n")
    guest_kept = ring.head + len(kept)
    assert int(markers[0]) == guest_total - guest_kept, "the count is every byte dropped, in all"
    assert kept.startswith(b"line "), "the kept tail starts at a line"


def test_small_output_is_kept_whole(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    _run(Ring(1 << 20), log, [b"hello\n", b"world\n"])
    assert log.read_bytes() == b"hello\nworld\n"
