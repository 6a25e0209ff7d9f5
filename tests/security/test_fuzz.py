"""Fuzz every verb through the real sudo path, as a real user (hardening: "fuzz
every verb as a real user").

Hypothesis builds argv from the verb table and from anything at all: verbs,
names, flags, values, Unicode, control characters, long strings, options after
`--`. The caller is a user with no VMs, so no example can legitimately change
anything. For every example:
- the exit status is never 1 (an internal error) and never a crash;
- stderr is exactly one printable line, never a traceback;
- with --json, stdout is one JSON object with the same exit code;
- the state, runtime and log trees are unchanged.

KVMGATE_FUZZ_EXAMPLES chooses the number of examples (default 60, tens of
seconds); the long run is `./test.sh --all` (marked slow: 1,000 examples).
"""

from __future__ import annotations

import json
import os
import pwd

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmgate.model.commands import VERBS

from ..conftest import HELPER, Kvmgate, run

WORDS = sorted({v.name for v in VERBS} | {f.name for v in VERBS for f in v.flags})
VALUES = st.one_of(
    st.sampled_from(
        ["web", "target", "x" * 64, "..", "/", "-", "--", "0", "\u00b2", "\u0661", "a:b", "root:x", "--json"]
    ),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x9F), max_size=20),
    st.text(alphabet="0123456789", min_size=1, max_size=25),
    st.builds(lambda n: "y" * n, st.integers(1000, 20000)),
)
OPTIONS = st.lists(
    st.one_of(
        st.sampled_from(["-m", "-hda", "-append", "-snapshot", "-vnc", "-loadvm", "-net", "-option-rom"]), VALUES
    ),
    max_size=6,
)
ARGV = st.tuples(
    st.one_of(st.sampled_from(WORDS), VALUES),
    st.lists(st.one_of(st.sampled_from(WORDS), VALUES), max_size=5),
    st.one_of(st.just([]), OPTIONS.map(lambda o: ["--", *o])),
).map(lambda t: [t[0], *t[1], *t[2]])

EXAMPLES = int(os.environ.get("KVMGATE_FUZZ_EXAMPLES", "60"))


def _clean(args: list[str]) -> list[str]:
    return [a.replace("\x00", "") for a in args]  # argv cannot carry NUL


def _check(kg: Kvmgate, user: str, args: list[str]) -> None:
    before = kg.state_snapshot()
    pw = pwd.getpwnam(user)
    r = run(
        ["sudo", "-n", HELPER, *args],
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "USER": user, "LANG": "C.UTF-8"},
        cwd="/",
        timeout=60,
    )
    assert r.returncode not in (1, -6, -11), (args, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, (args, r.stderr)
    if r.returncode:
        lines = r.stderr.split("\n")
        assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("kvmgate: "), (args, r.stderr)
        assert lines[0].isprintable(), (args, r.stderr)
        flags = args[: args.index("--")] if "--" in args else args
        if "--json" in flags:
            out = json.loads(r.stdout.splitlines()[-1])
            assert out["exit"] == r.returncode, (args, r.stdout)
    assert kg.state_snapshot() == before, args


@pytest.fixture(scope="module")
def nobody_much(users) -> str:  # type: ignore[no-untyped-def]
    """A real user who owns nothing: every example must be refused, or read-only."""
    return str(users.make("kgz"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(args=ARGV)
def test_fuzzed_argv_through_sudo(kg: Kvmgate, nobody_much: str, args: list[str]) -> None:
    _check(kg, nobody_much, _clean(args))


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=ARGV)
def test_fuzzed_argv_through_sudo_long(kg: Kvmgate, nobody_much: str, args: list[str]) -> None:
    _check(kg, nobody_much, _clean(args))
