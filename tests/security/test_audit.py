"""Every refusal is audited: also those the helper makes before it knows the verb
(usage errors) or the caller (a failed identification), and every such line on
the terminal is one printable line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..conftest import HELPER, Kvmgate

AUDIT = Path("/opt/kvmgate-test/log/audit.log")


def last_record() -> dict:
    return json.loads(AUDIT.read_text().splitlines()[-1])  # type: ignore[no-any-return]


def test_usage_errors_are_audited_with_the_caller(kg: Kvmgate, bob: str) -> None:
    r = kg("stat", "web", user=bob)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    rec = last_record()
    assert (rec["caller"], rec["uid"], rec["verb"], rec["outcome"], rec["exit"]) == (
        bob,
        __import__("pwd").getpwnam(bob).pw_uid,
        "stat",
        "refused",
        2,
    )
    r = kg("start", "web", "--owner", user=bob)
    assert r.returncode == 2 and last_record()["reason"].startswith("--owner needs a value")


def test_a_failed_identification_is_audited() -> None:
    """Root running the helper with a malformed SUDO_UID: refused before any verb runs."""
    env = {"PATH": "/usr/bin:/bin", "SUDO_UID": "12ab"}
    r = subprocess.run([HELPER, "status", "web"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 3 and "malformed SUDO_UID" in r.stderr
    rec = last_record()
    assert (rec["caller"], rec["verb"], rec["outcome"], rec["exit"]) == (None, "status", "refused", 3)


def test_a_control_character_in_a_name_is_shown_escaped(kg: Kvmgate, bob: str) -> None:
    for name in ("web\nkvmgate: started web (pid 1)", "x\x1b]0;owned\x07", "x\x1b[2J"):
        r = kg("status", name, user=bob)
        assert r.returncode == 4
        assert r.stderr.count("\n") == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr
        assert r.stderr.isprintable() or r.stderr[:-1].isprintable()


def test_errors_of_read_commands_are_json_with_json(kg: Kvmgate, bob: str) -> None:
    r = kg("status", "nothing-here", "--json", user=bob)
    assert r.returncode == 4 and json.loads(r.stdout) == {"error": "no such VM: nothing-here", "exit": 4}
    assert os.stat(AUDIT).st_mode & 0o077 == 0


def test_json_errors_also_for_usage_errors(kg: Kvmgate, bob: str) -> None:
    r = kg("status", "web", "--json", "--bogus", user=bob)
    assert r.returncode == 2 and json.loads(r.stdout)["exit"] == 2
    r = kg("start", "web", "--", "--json", user=bob)  # after --, --json is a VM option, not ours
    assert r.returncode == 4 and r.stdout == ""


def test_a_regex_too_big_for_python_is_a_usage_error(kg: Kvmgate, bob: str) -> None:
    r = kg("console", "web", "--expect", "a{4294967296}", user=bob)
    assert r.returncode == 2 and "internal error" not in r.stderr


def _records_of(user: str, text: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r.get("caller") == user]


def test_repeated_refusals_are_rate_limited_with_a_summary(kg: Kvmgate, users, alice: str) -> None:
    """A refusal loop once grew the log without end. Now each caller has a bucket
    (here 5 at once, then one per 2 s): what is held back is counted, the count is
    written by the next `admin reap`, and other callers are not affected."""
    from ..conftest import DEFAULT_POLICY

    kg.write_policy(DEFAULT_POLICY.replace("audit_burst = 100000", "audit_burst = 5\naudit_refill_seconds = 2"))
    mallory = users.make("kgm")
    start = AUDIT.stat().st_size
    for i in range(30):
        assert kg("start", f"nosuch{i}", user=mallory).returncode == 4
        if i == 15:
            assert kg("start", "alices-own-refusal", user=alice).returncode == 4
    text = AUDIT.read_text()[start:]
    recorded = [r for r in _records_of(mallory, text) if r["verb"] == "start"]
    assert 5 <= len(recorded) <= 10, len(recorded)
    assert any(r.get("vm") == "alices-own-refusal" for r in _records_of(alice, text)), "another caller's record"
    kg.ok("admin", "reap")
    text = AUDIT.read_text()[start:]
    uid = __import__("pwd").getpwnam(mallory).pw_uid
    summaries = [r for r in map(json.loads, text.splitlines()) if r.get("outcome") == "suppressed" and r["uid"] == uid]
    assert sum(r["held_back"] for r in summaries) + len(recorded) == 30, summaries


def test_the_helper_rotates_the_log_at_its_bound(kg: Kvmgate, bob: str) -> None:
    """However the log grew, the helper itself moves it aside past 64 MiB."""
    with open(AUDIT, "ab") as f:
        f.write(b"#" * (64 << 20))
    try:
        assert kg("start", "nosuch", user=bob).returncode == 4
        assert Path(f"{AUDIT}.1").stat().st_size > 64 << 20
        assert kg("start", "nosuch-after", user=bob).returncode == 4
        assert AUDIT.stat().st_size < 64 << 10 and last_record()["vm"] == "nosuch-after"
    finally:
        Path(f"{AUDIT}.1").unlink(missing_ok=True)


def test_logrotate_snippet_rotates_the_log(kg: Kvmgate, bob: str, tmp_path: Path) -> None:
    from ..conftest import LOGROTATE

    assert kg("start", "before-rotation", user=bob).returncode == 4
    r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), LOGROTATE], capture_output=True, text=True)
    try:
        assert r.returncode == 0, r.stderr
        assert "before-rotation" in Path(f"{AUDIT}.1").read_text()
        assert kg("start", "after-rotation", user=bob).returncode == 4
        assert last_record()["vm"] == "after-rotation" and (AUDIT.stat().st_mode & 0o777) == 0o600
    finally:
        Path(f"{AUDIT}.1").unlink(missing_ok=True)
