"""host/ownermap.py on real files (no QEMU): the map file rewritten in its older
slot, answers read without following links or blocking on a fifo, a damaged
record refused for allocations and rebuilt by a publish, and a running server
the registry no longer resolves still counted."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from kvmgate.errors import KvmgateError
from kvmgate.host import ownermap as hom
from kvmgate.model import ownermap as om
from kvmgate.model.policy.network import HostNet
from kvmgate.model.policy.policy import Policy
from kvmgate.paths import Paths


def _net() -> HostNet:
    return Policy.from_dict({}).net


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "state").mkdir()
    (tmp_path / "run").mkdir()
    return Paths(etc=str(tmp_path / "etc"), state=str(tmp_path / "state"), run=str(tmp_path / "run"))


def test_the_map_goes_into_the_older_slot_and_the_newest_is_read(tmp_path: Path) -> None:
    f = str(tmp_path / "ownermap")
    a = om.publish(om.State(), [om.Row("services", "10.77.0.2", "alice", "a1")])
    hom._write_map(f, a, ["services"], fresh=True)
    assert os.path.getsize(f) == om.MAP_BYTES
    b = om.publish(a, [om.Row("services", "10.77.0.3", "bob", "b1")])
    hom._write_map(f, b, ["services"])
    raw = Path(f).read_bytes()
    slots = [om.read_slot(raw[: om.SLOT]), om.read_slot(raw[om.SLOT :])]
    assert slots == [(1, b"services 10.77.0.2 alice a1\n"), (2, b"services 10.77.0.3 bob b1\n")]
    c = om.publish(b, [])
    hom._write_map(f, c, ["services"])
    assert om.read_slot(Path(f).read_bytes()[: om.SLOT]) == (3, b""), "the older slot, 0, again"
    hom._write_map(str(tmp_path / "absent"), c, ["services"])  # a server that is not running: nothing
    assert not (tmp_path / "absent").exists()


def test_answers_are_read_from_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "ownerack").write_bytes(om.ack(5))
    assert hom.read_ack(str(tmp_path)) == 5
    other = tmp_path / "o"
    other.mkdir()
    (other / "target").write_bytes(om.ack(9))
    os.symlink(other / "target", other / "ownerack")
    assert hom.read_ack(str(other)) == 0, "never through a link"
    fifo = tmp_path / "f"
    fifo.mkdir()
    os.mkfifo(fifo / "ownerack")
    assert hom.read_ack(str(fifo)) == 0, "a fifo neither blocks nor counts"


def test_a_damaged_record_is_refused_then_rebuilt_above_every_generation(paths: Paths) -> None:
    net = _net()
    Path(paths.state, "ownermap.json").write_text("{not json")
    with pytest.raises(KvmgateError, match="net-up"):
        hom.load(paths)
    # A server still runs (found by its runtime directory: its lock is held) and has seen generation 70.
    d = Path(paths.run, "k1")
    d.mkdir()
    (d / "ownerack").write_bytes(om.ack(70))
    lock = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        state = hom.publish(paths, net, [])
        assert state.generation > 70 and {f.network for f in state.fence} == set(hom._services(net))
        assert hom.load(paths) == state
        report = hom.report(paths, net, [])
        assert report["fenced"] and report["servers"] == [
            {"server": "k1", "live": True, "applied": 70, "networks": hom._services(net)}
        ]
    finally:
        os.close(lock)
    # Once no server is live the fence is gone at the next publish.
    assert hom.publish(paths, net, []).fence == ()
