"""Fixtures the integration modules share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .test_ssh_logon import Sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """sshd on loopback, one per module (a module may override it, as test_logon does)."""
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o700)
    s = Sshd(d)
    yield s
    s.stop()
