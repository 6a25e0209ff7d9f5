"""The installation itself: root-owned, isolated interpreter, syslog records."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import syslog
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import CRON, HELPER, INSTALL_ARGS, PAUSE_CONTROL, PREFIX, REPO, SUDOERS, UNITDIR, Kvmgate


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


UNITS = {
    "kvmgate-reap.service",
    "kvmgate-reap.timer",
    "kvmgate-runtime.service",
    "kvmgate-autostart.service",
    "kvmgate-vm@.service",
    "kvmgate-gated.service",
    "kvmgate-network.service",
    "kvmgate.slice",
    "kvmgate-guests.service",
    "kvmgate-sessions.service",
}


def test_the_units_are_installed_with_this_installations_paths(kg: Kvmgate) -> None:
    """install.sh once copied the units only under share/doc: nothing reaped, nothing
    ran at boot, gated never ran. They are installed into the unit directory, with
    this installation's paths, and pass systemd-analyze verify there."""
    installed = sorted(Path(UNITDIR).iterdir())
    assert {u.name for u in installed} == UNITS
    for unit in installed:
        text = unit.read_text()
        assert "/usr/local" not in text, unit.name
        assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert f"ExecStart={PREFIX}/bin/kvmgate admin reap" in Path(UNITDIR, "kvmgate-reap.service").read_text()
    r = subprocess.run(["systemd-analyze", "verify", *map(str, installed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "kvmgate" not in r.stderr, r.stderr


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> {log}
"""


def test_install_enables_and_starts_the_units_where_systemd_runs(kg: Kvmgate, tmp_path: Path) -> None:
    """Where systemd is PID 1, install.sh reloads it and enables and starts the units
    (here with --systemd yes and a systemctl that records what it was asked)."""
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text(FAKE_SYSTEMCTL.format(log=log))
    (fake / "systemctl").chmod(0o755)
    units = tmp_path / "units"
    args = [*INSTALL_ARGS, "--test-pause-points", PAUSE_CONTROL, "--unitdir", str(units), "--systemd", "yes"]
    env = {"PATH": f"{fake}:/usr/sbin:/usr/bin:/sbin:/bin"}
    out = subprocess.run([str(REPO / "install.sh"), *args], env=env, capture_output=True, text=True, check=True)
    assert "enabled and started the kvmgate units" in out.stdout
    assert log.read_text().splitlines() == [
        "daemon-reload",
        "enable --now kvmgate-runtime.service kvmgate-network.service kvmgate-reap.timer "
        "kvmgate-autostart.service kvmgate-gated.service kvmgate-guests.service kvmgate-sessions.service",
    ]
    assert {u.name for u in units.iterdir()} == UNITS


def test_without_systemd_init_says_what_does_not_run_and_cron_runs_it(kg: Kvmgate) -> None:
    """Without systemd as PID 1, `admin init` says what will not run; `--cron`
    installs cron lines for it, and each line's command runs here."""
    out = kg.ok("admin", "init").stdout
    assert "systemd is not running here, so kvmgate's units do not run" in out and "--cron" in out
    try:
        assert f"installed {CRON}" in kg.ok("admin", "init", "--cron").stdout
        assert f"{CRON} runs what its units would" in kg.ok("admin", "init").stdout
        jobs = [line for line in Path(CRON).read_text().splitlines() if line[:1] in "*@"]
        assert len(jobs) == 4
        commands = [re.split(r"\s+", j, maxsplit=6 if j.startswith("*") else 2)[-1] for j in jobs]
        reap, boot, gated, watcher = (c.split(" ", 1)[1] if c.startswith("root ") else c for c in commands)
        assert "admin sessions --watch" in watcher  # test_logind.py runs it against elogind
        for command in (reap, boot):
            subprocess.run(["sh", "-c", command], check=True, timeout=120)
        others = set(_gated_pids())  # another test's gated, if one runs
        first = subprocess.Popen(["sh", "-c", gated])
        try:
            deadline = time.monotonic() + 30
            while not set(_gated_pids()) - others:
                assert time.monotonic() < deadline, "the cron line started kvmgate-gated"
                time.sleep(0.2)
            second = subprocess.run(["sh", "-c", gated], timeout=30)
            assert second.returncode == 0 and len(set(_gated_pids()) - others) == 1, "a second copy never starts"
        finally:
            for pid in set(_gated_pids()) - others:
                os.kill(pid, 15)
            first.wait(30)
    finally:
        kg.ok("admin", "init", "--no-cron")
    assert not os.path.exists(CRON)


def _gated_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-u", "kvmgate-gated", "-f", "kvmgate-gated"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_service_vm_is_handed_to_its_watcher_unit_by_its_escaped_name() -> None:
    from kvmgate.host.schedule import watcher_unit

    assert watcher_unit("kvmgate-svc", "web-1") == "kvmgate-vm@kvmgate\\x2dsvc:web\\x2d1.service"


def test_unit_commands_run(kg: Kvmgate) -> None:
    """What the units run, run here (there is no systemd as PID 1 to start them)."""
    kg.ok("admin", "init")
    kg.ok("admin", "reap")
    kg.ok("admin", "autostart")
