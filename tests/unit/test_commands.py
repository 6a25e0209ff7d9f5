"""The one verb table: the helper's strict parser and the front end's help agree,
and the parser refuses everything outside the table (one field changed at a time)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.cli.help import build_parser
from kvmgate.errors import UsageError
from kvmgate.model.commands import VERBS, Request, Verb, parse, unparse


def full_argv(verb: Verb) -> list[str]:
    """Every flag of the verb, with a valid value, and its target."""
    argv = list(verb.words)
    for f in verb.flags:
        argv += [f.name] if f.metavar is None else [f.name, f.choices[0] if f.choices else "x1"]
    if verb.target is not None:
        argv.append("vm1")
    return argv


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


PUBLIC = [v for v in VERBS if not v.internal]


def test_help_lists_exactly_the_public_verbs() -> None:
    top = subparsers(build_parser())
    admin = subparsers(top.pop("admin"))
    groups = {g: subparsers(admin.pop(g)) for g in ("image", "template")}
    listed = set(top) | {f"admin-{n}" for n in admin} | {f"admin-{g}-{n}" for g, sub in groups.items() for n in sub}
    assert listed == {v.name for v in PUBLIC}


@pytest.mark.parametrize("verb", PUBLIC, ids=lambda v: v.name)
def test_help_and_helper_accept_the_same_words(verb: Verb) -> None:
    argv = full_argv(verb)
    ns = build_parser().parse_args(argv)
    if verb.target is not None:
        assert ns.name == "vm1"
    if verb.frontend:
        return  # the front end handles it; the helper does not know it
    req = parse(argv)
    assert req.verb == verb.name and req.name == (None if verb.target is None else "vm1")
    assert set(req.flags) == {f.name for f in verb.flags}
    for f in verb.flags:  # and argparse knows every flag under the same name
        assert getattr(ns, f.name.lstrip("-").replace("-", "_")) not in (None, False)


@pytest.mark.parametrize("verb", [v for v in VERBS if not v.frontend], ids=lambda v: v.name)
def test_the_helper_parses_each_verb_minimally(verb: Verb) -> None:
    argv = list(verb.words)
    argv += [w for f in verb.flags if f.required for w in (f.name, "x1")]
    if verb.target is not None:
        argv.append("vm1")
    assert parse(argv).verb == verb.name


BASE = ["start", "--owner", "alice", "web", "--", "-snapshot"]


def test_a_valid_base() -> None:
    assert parse(BASE) == Request("start", "web", {"--owner": "alice"}, ("-snapshot",))


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "missing verb"),
        (["sart", "web"], "unknown verb"),
        (["ssh", "web"], "unknown verb"),  # the front end's, never the helper's
        (["admin"], "unknown verb"),
        (["start", "--own", "alice", "web"], "unknown flag"),  # no abbreviations
        (["start", "--owner=alice", "web"], "unknown flag"),  # no --flag=value
        (["start", "--owner", "a", "--owner", "b", "web"], "given twice"),
        (["start", "web", "--owner"], "needs a value"),
        (["start"], "needs a VM name"),
        (["start", "web", "other"], "unexpected argument"),
        (["stop", "web", "--", "-snapshot"], "takes no VM options"),
        (["list", "web"], "unexpected argument"),
        (["admin", "set", "web", "--on-logoff", "sleep"], "takes none, pause, hibernate"),
        (["admin", "show", "web"], "needs --owner"),
        (["admin", "init", "--accel", "xen"], "takes auto, kvm, tcg"),
        (["gated-hold", "web", "--pid"], "needs a value"),
    ],
)
def test_refusals(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_options_after_the_separator_are_never_flags() -> None:
    assert parse(["start", "web", "--", "--owner", "bob", "--"]).options == ("--owner", "bob", "--")
    assert parse(["start", "web", "--", "--owner", "bob"]).flags == {}


def test_a_qemu_option_without_the_separator_gets_a_hint() -> None:
    with pytest.raises(UsageError, match=r"unknown flag '-m' \(QEMU options go after `--`: kvmgate start NAME -- -m"):
        parse(["start", "web", "-m", "512"])
    with pytest.raises(UsageError) as err:
        parse(["status", "web", "-m"])
    assert "--`" not in str(err.value), "no hint where no VM options are taken"


def test_top_level_help_lists_the_whole_vocabulary() -> None:
    """The README said `kvmgate --help` lists the option vocabulary; it did not."""
    from kvmgate.model.policy.table import OPTIONS

    text = build_parser().format_help()
    assert all(f"    {name} " in text for name in OPTIONS), [n for n in OPTIONS if f"    {n} " not in text]


@pytest.mark.parametrize("verb", [v for v in VERBS if not v.frontend], ids=lambda v: v.name)
def test_every_verb_is_routed_to_a_module_that_runs_it(verb: Verb) -> None:
    import importlib

    from kvmgate import entry

    module = entry.ROUTES.get(verb.name) or ("admin" if verb.name.startswith("admin-") else "")
    assert module, f"{verb.name} has no route"
    assert callable(importlib.import_module(f"kvmgate.verbs.{module}").run)


@settings(max_examples=300)
@given(st.sampled_from([v for v in VERBS if not v.frontend]), st.data())
def test_every_request_unparses_to_words_that_parse_back(verb, data) -> None:  # type: ignore[no-untyped-def]
    """The Slurm backend relays a request to the VM's node as words (ops.relay)."""
    words = list(verb.words)
    if verb.target is not None:
        words.append(data.draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)))
    for _ in verb.args:
        words.append(data.draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)))
    for spec in verb.flags:
        if spec.required or data.draw(st.booleans()):
            words += (
                [spec.name]
                if spec.metavar is None
                else [
                    spec.name,
                    data.draw(
                        st.sampled_from(spec.choices)
                        if spec.choices
                        else st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
                    ),
                ]
            )
    if verb.options and data.draw(st.booleans()):
        words += ["--", "-m", "256"]
    req = parse(words)
    assert parse(unparse(req)) == req
    if not (verb.flag("--owner") and verb.flag("--owner").required):  # type: ignore[union-attr]
        dropped = parse(unparse(req, drop=("--owner",)))
        assert "--owner" not in dropped.flags and dropped._replace(flags={}) == req._replace(flags={})
