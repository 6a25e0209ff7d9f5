"""The QEMU version as probed (`--version`) and as recorded with a saved state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.errors import KvmgateError
from kvmgate.host.qemu_version import VERSION_LINE, parse, text


@pytest.mark.parametrize(
    "out, version",
    [
        (b"QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022", (7, 2, 19)),
        (b"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n", (10, 0, 2)),
    ],
)
def test_the_version_line_of_debians_qemus(out: bytes, version: tuple[int, int, int]) -> None:
    m = VERSION_LINE.search(out)
    assert m is not None and tuple(int(g) for g in m.groups()) == version


@given(st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)))
def test_a_recorded_version_reads_back(v: tuple[int, int, int]) -> None:
    assert parse(text(v)) == v


@pytest.mark.parametrize("bad", ["", "7.2", "7.2.0.1", "10.0.2-rc1", "\u0667.2.0", " 7.2.0", "7.2.0\n", "1000.0.0"])
def test_anything_else_recorded_is_refused(bad: str) -> None:
    with pytest.raises(KvmgateError, match="not one"):
        parse(bad)
