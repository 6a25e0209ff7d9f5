"""What a user sends may not size root's work or root's files (hardening, first
cases): the audit record of a refusal has a bounded size; an image header that
asks for an impossible overlay is a refusal naming the user's file, not an
internal error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kvmgate.model import qcow2

from ..conftest import Kvmgate
from .conftest import give

AUDIT = Path("/opt/kvmgate-test/log/audit.log")


def test_a_huge_refused_request_writes_a_small_audit_record(kg: Kvmgate, bob: str) -> None:
    """Once 120 kB a call, 34 MiB from one loop in 5 s."""
    before = AUDIT.stat().st_size if AUDIT.exists() else 0
    huge = "console=ttyS0 " + "x" * 120_000
    for _ in range(5):
        r = kg("start", "nosuch", "--", "-append", huge, "-append", huge, user=bob)
        assert r.returncode == 4
    grown = AUDIT.stat().st_size - before
    assert grown < 5 * 4096, grown
    rec = json.loads(AUDIT.read_text().splitlines()[-1])
    assert (rec["caller"], rec["verb"], rec["vm"], rec["outcome"]) == (bob, "start", "nosuch", "refused")
    assert rec["options"][0] == "-append" and "120014 characters, sha256 " in rec["options"][1]


def test_an_overlay_the_header_makes_impossible_is_refused(
    kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path, unchanged: None
) -> None:
    """A qcow2 header with a virtual size that is not whole sectors: the -snapshot
    overlay cannot be made for it. Once a ValueError (exit 1)."""
    img = bytearray(qcow2.empty_image(1 << 20))
    struct.pack_into(">Q", img, 24, 1000)  # virtual size: 1000 bytes
    src = tmp_path / "odd.qcow2"
    src.write_bytes(bytes(img))
    path = give(alice, src, "odd.qcow2")
    r = kg("start", alice_vm, "--", "-hdb", str(path), "-snapshot", user=alice)
    assert r.returncode == 3, r.stderr
    assert (
        r.stderr
        == f"kvmgate: {path}: no -snapshot overlay for this image (virtual size must be a positive multiple of 512)\n"
    )
