"""`kvmgate ssh`: the front end's ssh(1) command line, built from the helper's
`ports --json` answer (both ends replaced here: the helper and exec)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from kvmgate.cli import main as cli


@pytest.mark.parametrize(
    "extra",
    [[], ["-v", "-l", "root"], ["-lroot", "uptime", "-a"], ["-o", "A=b", "-4", "--", "ls", "-l"], ["uptime"]],
)
def test_the_users_ssh_arguments_follow_the_destination_verbatim(extra: list[str]) -> None:
    """OpenSSH reads options after the destination too; kvmgate's own port and host
    key alias come first, where ssh takes the first value given for each option."""
    argv = cli.ssh_argv(20000, "127.0.0.1", "alice", "web", extra)
    assert argv[:8] == ["ssh", "-p", "20000", "-o", "HostKeyAlias=kvmgate-alice-web",
                        "-o", "StrictHostKeyChecking=accept-new", "127.0.0.1"]  # fmt: skip
    assert argv[8:] == extra


def _fake(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]], code: int = 0) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, code, json.dumps(rows), "kvmgate: no such VM: web\n")

    def execvp(file: str, argv: list[str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(cli.os, "execvp", execvp)
    return calls


ROWS = [
    {"service": "http", "guest_port": 80, "host": "127.0.0.1", "port": 20001, "via": "qemu", "held": True},
    {"service": "ssh", "guest_port": 22, "host": "127.0.0.1", "port": 20000, "via": "qemu", "held": True},
]


def test_ssh_goes_to_the_forwarded_ssh_port_with_a_per_vm_host_key_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, ROWS)
    with pytest.raises(SystemExit):
        cli.ssh(["--owner", "alice", "web"], ["-l", "root", "uptime"])
    assert calls[0][-5:] == ["ports", "web", "--owner", "alice", "--json"]
    assert calls[1] == [
        "ssh",
        "-p",
        "20000",
        "-o",
        "HostKeyAlias=kvmgate-alice-web",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "127.0.0.1",
        "-l",
        "root",
        "uptime",
    ]


def test_ssh_to_a_public_forward_connects_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, [{**ROWS[1], "host": "0.0.0.0", "service": "tcp22"}])
    with pytest.raises(SystemExit):
        cli.ssh(["--owner", "bob", "db"], [])
    assert calls[1][:3] == ["ssh", "-p", "20000"] and calls[1][7] == "127.0.0.1"


def test_ssh_without_a_forward_or_a_vm_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake(monkeypatch, ROWS[:1])
    assert cli.ssh(["--owner", "alice", "web"], []) == 3
    assert "no forwarded ssh port" in capsys.readouterr().err
    _fake(monkeypatch, [], code=4)
    assert cli.ssh(["--owner", "alice", "web"], []) == 4
    assert cli.ssh([], []) == 2


def test_ssh_refuses_a_port_the_vm_does_not_hold(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped, or another program on the port: never hand the connection over."""
    calls = _fake(monkeypatch, [{**ROWS[1], "held": False}])
    assert cli.ssh(["--owner", "alice", "web"], []) == 5
    assert len(calls) == 1, "ssh was never run"
    assert "is not held by the VM" in capsys.readouterr().err
