"""host.pam: the lines installed per service, their removal, the legacy line's
migration, and whose session an event is (the loginuid, with PAM_USER only a veto)."""

from __future__ import annotations

from pathlib import Path

from kvmgate.host import pam
from kvmgate.paths import Paths

PATHS = Paths(helper="/opt/kg/lib/kvmgate/kvmgate-helper")
HOOK = "/opt/kg/lib/kvmgate/kvmgate-pam"
START = "/opt/kg/lib/kvmgate/kvmgate-pam-start"


def _stacks(tmp_path: Path) -> Path:
    (tmp_path / "sshd").write_text("session required pam_loginuid.so\n@include common-session\n")
    (tmp_path / "common-session").write_text(
        f"session required pam_unix.so\n{pam.MARK}\nsession optional pam_exec.so quiet {HOOK}\n"
    )
    (tmp_path / "sshd").chmod(0o640)
    return tmp_path


def test_install_moves_the_legacy_line_and_is_idempotent(tmp_path: Path) -> None:
    d = _stacks(tmp_path)
    out = pam.install_pam(PATHS, str(d))
    assert "removed the old common-session line" in out and f"{d}/login does not exist" in out
    assert (d / "common-session").read_text() == "session required pam_unix.so\n"
    text = (d / "sshd").read_text()
    assert text.endswith(
        f"{pam.MARK}\nsession optional pam_exec.so quiet type=open_session {START} sshd open\n"
        f"session optional pam_exec.so quiet type=close_session {START} sshd close\n"
    )
    assert (d / "sshd").stat().st_mode & 0o777 == 0o640, "the file's mode is kept"
    assert "already runs" in pam.install_pam(PATHS, str(d))
    assert (d / "sshd").read_text() == text


def test_uninstall_removes_every_line(tmp_path: Path) -> None:
    d = _stacks(tmp_path)
    pam.install_pam(PATHS, str(d))
    (d / "cockpit").write_text(f"session optional pam_exec.so quiet type=open_session {HOOK} cockpit open\n")
    pam.uninstall_pam(PATHS, str(d))
    for f in d.iterdir():
        if not f.name.endswith(".kvmgate-backup"):
            assert HOOK not in f.read_text() and pam.MARK not in f.read_text(), f


def test_a_line_that_runs_the_hook_itself_is_replaced(tmp_path: Path) -> None:
    """Releases before the static start script ran kvmgate-pam (dynamically linked)
    straight from pam_exec, under the PAM environment: such lines are replaced."""
    d = _stacks(tmp_path)
    (d / "common-session").write_text("session required pam_unix.so\n")
    (d / "sshd").write_text(f"{pam.MARK}\nsession optional pam_exec.so quiet type=open_session {HOOK} sshd open\n")
    pam.install_pam(PATHS, str(d))
    text = (d / "sshd").read_text()
    assert f"{HOOK} sshd" not in text and f"{START} sshd open" in text


def test_the_hook_is_installed_only_with_a_static_shell(tmp_path: Path) -> None:
    import pytest

    from kvmgate.errors import PermissionRefused

    assert pam.is_static("/bin/busybox"), "busybox-static is a runtime dependency"
    assert not pam.is_static("/bin/sh") and not pam.is_static("/usr/bin/python3")
    d = _stacks(tmp_path)
    before = (d / "sshd").read_text()
    with pytest.raises(PermissionRefused, match="not a static executable"):
        pam.install_pam(PATHS, str(d), shell="/bin/sh")
    assert (d / "sshd").read_text() == before
