"""What a saved state records of the QEMU that wrote it (host.migrate._made_by):
only the shapes a restore can ask for, whatever a QEMU (a guest's, perhaps) says."""

from __future__ import annotations

from typing import Any

import pytest

from kvmgate.errors import KvmgateError
from kvmgate.host.migrate import _made_by


class FakeQMP:
    def __init__(self, version: Any, machine: Any) -> None:
        self.answers = {"query-version": {"qemu": version}, "qom-get": machine}

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.answers[command]


V72 = {"major": 7, "minor": 2, "micro": 22}


def test_a_qemu_says_its_version_and_versioned_machine_type() -> None:
    assert _made_by(FakeQMP(V72, "pc-i440fx-7.2-machine")) == ("7.2.22", "pc-i440fx-7.2")  # type: ignore[arg-type]
    v10 = {"major": 10, "minor": 0, "micro": 2}
    assert _made_by(FakeQMP(v10, "pc-q35-10.0-machine")) == ("10.0.2", "pc-q35-10.0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "version, machine",
    [
        (V72, "pc-i440fx-noble-machine"),  # a distribution's unversioned type: no restore could ask for it
        (V72, "pc-i440fx-7.2,accel=kvm-machine"),
        (V72, "pc-i440fx-7.2\n-machine"),
        (V72, "x" * 100_000),
        ({"major": -1, "minor": 2, "micro": 0}, "pc-i440fx-7.2-machine"),
        ({"major": 7, "minor": 2}, "pc-i440fx-7.2-machine"),
        ("7.2.0", "pc-i440fx-7.2-machine"),
        ({"major": 1000, "minor": 2, "micro": 0}, "pc-i440fx-7.2-machine"),
    ],
)
def test_anything_else_refuses_the_hibernate_before_it_starts(version: Any, machine: Any) -> None:
    with pytest.raises(KvmgateError, match="cannot hibernate"):
        _made_by(FakeQMP(version, machine))  # type: ignore[arg-type]
