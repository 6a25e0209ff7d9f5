"""Session records (store/sessions.py) on one host, and shared by a Slurm
cluster's login nodes: each node prunes only its own records, and counts every
other node's as live."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kvmgate.paths import Paths
from kvmgate.store.runtime import process_start
from kvmgate.store.sessions import Sessions


def paths(tmp: Path) -> Paths:
    (tmp / "state").mkdir()
    (tmp / "run").mkdir()
    return Paths(etc=str(tmp / "etc"), state=str(tmp / "state"), run=str(tmp / "run"))


def test_on_one_host_records_live_in_run(tmp_path: Path) -> None:
    s = Sessions(paths(tmp_path), "alice")
    assert s.root == str(tmp_path / "run" / "sessions") and s.host == ""
    with s.locked():
        s.add(os.getpid())
        s.add(999_999_999, start=1)  # a leader that is gone
        assert s.prune() == (2, 1)
    assert s.records() == [f"{os.getpid()}-{process_start(os.getpid())}"]
    with s.locked():
        s.remove(os.getpid())
    assert s.live() == 0


def test_login_nodes_share_records_and_prune_only_their_own(tmp_path: Path) -> None:
    p = paths(tmp_path)
    os.mkdir(os.path.join(p.state, "sessions"))  # admin init --backend slurm
    s = Sessions(p, "alice")
    me = socket.gethostname()
    assert s.root == os.path.join(p.state, "sessions") and s.host == me + "@"
    with s.locked():
        s.add(os.getpid())
        s.add(999_999_999, start=1)
        Path(s.dir, "login-b@4242-77").touch()  # another login node's session: not ours to check
        Path(s.dir, "login-b@logind-c3").touch()
        assert s.prune() == (4, 3)
    assert sorted(s.records()) == sorted(
        ["login-b@4242-77", "login-b@logind-c3", f"{me}@{os.getpid()}-{process_start(os.getpid())}"]
    )
    with s.locked():
        s.set_logind({"7"})
        assert s.logind() == {"7"} and f"{me}@logind-7" in s.records()
        s.set_logind(set())
        s.remove(os.getpid())
        s.remove(4242)  # another node's pid: its record stays
    assert s.live() == 2 and "login-b@4242-77" in s.records()
