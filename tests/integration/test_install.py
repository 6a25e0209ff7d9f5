"""The installation itself: root-owned, isolated interpreter, syslog records."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import syslog
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import HELPER, PREFIX, SUDOERS, Kvmgate


def test_installed_code_is_root_owned_and_not_writable(kg: Kvmgate) -> None:
    for dirpath, dirnames, filenames in os.walk(f"{PREFIX}/lib/kvmgate"):
        for n in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, n))
            assert st.st_uid == 0 and st.st_gid == 0, n
            assert not st.st_mode & 0o022, n
    for d in (PREFIX, f"{PREFIX}/lib", f"{PREFIX}/etc"):
        assert not os.stat(d).st_mode & 0o022


def test_helper_runs_isolated(kg: Kvmgate) -> None:
    first = Path(HELPER).read_text().splitlines()[0]
    assert first == "#!/usr/bin/python3 -IS"
    sudoers = Path(SUDOERS)
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    assert f"Cmnd_Alias KVMGATE_TEST = {HELPER}" in sudoers.read_text()
    # another installation's drop-in (the demo's, say) coexists with this one
    assert subprocess.run(["visudo", "-c"], capture_output=True).returncode == 0


@pytest.fixture
def dev_log() -> Iterator[socket.socket]:
    if os.path.exists("/dev/log"):
        pytest.skip("a syslog daemon owns /dev/log on this host")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("/dev/log")
    s.settimeout(5)
    yield s
    s.close()
    os.unlink("/dev/log")


# <PRI>Mmm dd hh:mm:ss TAG[PID]: MESSAGE, as syslog(3) sends it to /dev/log
SYSLOG_RECORD = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ([^ \[]+)\[(\d+)\]: (.*)", re.S)


def test_refusals_go_to_syslog(kg: Kvmgate, alice: str, dev_log: socket.socket) -> None:
    kg("start", "nosuchvm", user=alice)
    while " kvmgate[" not in (msg := dev_log.recv(65536).decode()):
        pass  # sudo logs the command first; recv times out if kvmgate never logs
    m = SYSLOG_RECORD.fullmatch(msg)
    assert m and m[2] == "kvmgate", msg
    assert int(m[1]) == syslog.LOG_AUTHPRIV | syslog.LOG_WARNING, f"a refusal is authpriv.warning: {msg}"
    record = json.loads(m[4])
    assert (record["outcome"], record["caller"], record["vm"], record["verb"]) == (
        "refused",
        alice,
        "nosuchvm",
        "start",
    )


def test_unit_files_verify(kg: Kvmgate, tmp_path: Path) -> None:
    """The shipped units pass systemd-analyze verify (pointed at this installation)."""
    units = sorted(Path(__file__).resolve().parents[2].joinpath("packaging/systemd").iterdir())
    assert {u.name for u in units} >= {
        "kvmgate-reap.service",
        "kvmgate-reap.timer",
        "kvmgate-runtime.service",
        "kvmgate-autostart.service",
        "kvmgate-vm@.service",
        "kvmgate-gated.service",
        "kvmgate-network.service",
        "kvmgate.slice",
    }
    for unit in units:
        text = unit.read_text().replace("/usr/local/bin/kvmgate", f"{PREFIX}/bin/kvmgate")
        (tmp_path / unit.name).write_text(text.replace("/usr/local/lib/kvmgate", f"{PREFIX}/lib/kvmgate"))
    r = subprocess.run(
        ["systemd-analyze", "verify", *[str(tmp_path / u.name) for u in units]], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "kvmgate" not in r.stderr, r.stderr


def test_unit_commands_run(kg: Kvmgate) -> None:
    """What the units run, run here (there is no systemd as PID 1 to start them)."""
    kg.ok("admin", "init")
    kg.ok("admin", "reap")
    kg.ok("admin", "autostart")
