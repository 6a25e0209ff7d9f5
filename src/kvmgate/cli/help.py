"""`kvmgate --help`: argparse built from the one verb table (`model.commands`).

Loaded only when help is asked for: argparse costs the front end more start-up
time than everything else it does. argparse here only renders help and checks
the words of a help request; the helper parses every real call itself.
"""

from __future__ import annotations

import argparse

from kvmgate import __version__
from kvmgate.model.commands import VERBS, Verb

EPILOG = """\
exit status:
  0  ok
  1  internal error
  2  usage error
  3  refused by policy or permission
  4  no such VM for this caller (also when it exists but belongs to someone else)
  5  wrong state (already running, not running, already exists, busy)
  6  done, but by force (stop had to kill after the timeout)
  7  admin watch: the watched VM died

files:
  /etc/kvmgate/policy.toml   the admin's policy (root-owned)
  /var/lib/kvmgate/          VM identities, disks, logs (see docs/layout.md)
  /run/kvmgate/              root-only runtime state: QMP and console sockets, locks
  /run/kvmgate-display/      VNC sockets, each in a directory only its VM's owner can enter
  docs/                      design, architecture, layout, security, logon, networks
                             (installed under /usr/local/share/doc/kvmgate)
"""


def options_help() -> str:
    from kvmgate.model.policy.table import OPTIONS

    rows = []
    for lname in ("user", "admin", "unused"):
        rows.append(f"  {lname}:")
        rows += [f"    {n:<14} {o.summary}" for n, o in OPTIONS.items() if o.default == lname]
    return "\n".join(rows)


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], word: str, verb: Verb) -> None:
    epilog = verb.epilog.replace("{options}", options_help()) if verb.epilog else ""
    sp = sub.add_parser(
        word,
        help=verb.help,
        description=verb.help,
        usage=verb.usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(epilog + "\n\n" if epilog else "") + EPILOG,
    )
    for f in verb.flags:
        if f.metavar is None:
            sp.add_argument(f.name, action="store_true", help=f.help)
        else:
            sp.add_argument(
                f.name, metavar=f.metavar, help=f.help, required=f.required, choices=list(f.choices) or None
            )
    if verb.target is not None:
        sp.add_argument("name", metavar=verb.target, nargs="?" if verb.target_optional else None)
    for i, metavar in enumerate(verb.args):
        sp.add_argument(f"arg{i}", metavar=metavar, nargs="?")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmgate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run your own KVM virtual machines, defined for you by the administrator, "
        "through a small secure wrapper. Each VM runs as its owner, with the options the "
        "administrator fixed; users may add only the options their list allows.",
        epilog="VM options (the design note's vocabulary), in their default lists; the host's policy may\n"
        "move them (kvmgate start NAME -- OPTION...):\n" + options_help() + "\n\n" + EPILOG,
    )
    p.add_argument("--version", action="version", version=f"kvmgate {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    admin = None
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for verb in VERBS:
        if verb.internal:
            continue
        if len(verb.words) == 1:
            _add(sub, verb.name, verb)
            continue
        if len(verb.words) == 3:
            if verb.words[1] not in groups:
                assert admin is not None
                what = f"the {verb.words[1]}s" if verb.words[1] == "template" else f"the {verb.words[1]} library"
                gp = admin.add_parser(
                    verb.words[1],
                    help=f"{what} (root only)",
                    description=f"{what} (root only)",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=EPILOG,
                )
                groups[verb.words[1]] = gp.add_subparsers(dest="group_verb", metavar="COMMAND", required=True)
            _add(groups[verb.words[1]], verb.words[2], verb)
            continue
        if admin is None:
            ap = sub.add_parser(
                "admin",
                help="host and VM administration (root only)",
                description="host and VM administration (root only)",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=EPILOG,
            )
            admin = ap.add_subparsers(dest="admin_verb", metavar="ADMIN-COMMAND", required=True)
        _add(admin, verb.words[1], verb)
    return p
