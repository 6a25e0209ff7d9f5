"""kvmgate-helper: the privileged path, one straight line.

    scrub (fds, env, umask, cwd, rlimits, groups)
    -> identify the caller (real uid, or SUDO_UID under sudo)
    -> parse argv strictly
    -> load the root-owned policy
    -> resolve the VM by (owner, name) and validate its identity
    -> validate every option against the typed allowlist
    -> act (open with the owner's rights, fork, drop, exec)

Every refusal is one line on stderr, a stable exit code, and an audit record.
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import KvmgateError, PermissionRefused, UsageError
from ..paths import Paths, installed
from . import audit, caller

# verb -> (flags with a value, flags without, takes NAME, takes -- OPTIONS)
VERBS: dict[str, tuple[frozenset[str], frozenset[str], bool, bool]] = {
    "start": (frozenset({"--owner"}), frozenset({"--paused"}), True, True),
    "stop": (frozenset({"--owner", "--timeout"}), frozenset({"--force"}), True, False),
    "status": (frozenset({"--owner"}), frozenset({"--json"}), True, False),
    "list": (frozenset({"--owner"}), frozenset({"--json", "--services"}), False, False),
    "console": (frozenset({"--owner", "--expect", "--timeout"}), frozenset(), True, False),
    "freeze": (frozenset({"--owner"}), frozenset(), True, False),
    "thaw": (frozenset({"--owner"}), frozenset(), True, False),
    "hibernate": (frozenset({"--owner"}), frozenset(), True, False),
    "ports": (frozenset({"--owner"}), frozenset({"--json"}), True, False),
    "vnc": (frozenset({"--owner"}), frozenset({"--json"}), True, False),
    "admin-init": (frozenset({"--accel"}), frozenset({"--pam", "--no-pam"}), False, False),
    "admin-create": (
        frozenset({"--owner", "--disk-size", "--on-logoff", "--network", "--forward", "--wake"}),
        frozenset({"--service", "--no-autostart"}),
        True,
        True,
    ),
    "admin-autostart": (frozenset(), frozenset(), False, False),
    "admin-watch": (frozenset(), frozenset(), True, False),
    "admin-set": (
        frozenset({"--owner", "--on-logoff", "--wake", "--idle", "--forward", "--network"}),
        frozenset(),
        True,
        False,
    ),
    "admin-net-up": (frozenset(), frozenset(), False, False),
    "admin-net-down": (frozenset(), frozenset(), False, False),
    "admin-reap": (frozenset(), frozenset(), False, False),
    "pam-hook": (frozenset(), frozenset(), False, False),
    "gated-config": (frozenset(), frozenset(), False, False),
    "gated-wake": (frozenset(), frozenset(), True, False),
    "gated-hold": (frozenset({"--pid"}), frozenset({"--on", "--off"}), True, False),
    "gated-idle": (frozenset(), frozenset(), True, False),
    "admin-delete": (frozenset({"--owner"}), frozenset({"--keep-disks"}), True, False),
    "admin-list": (frozenset(), frozenset({"--json"}), False, False),
    "admin-show": (frozenset({"--owner"}), frozenset({"--json"}), True, False),
}


class Request:
    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.name: str | None = None
        self.flags: dict[str, str] = {}
        self.options: list[str] = []

    def flag(self, name: str) -> str | None:
        return self.flags.get(name)


def parse(argv: list[str]) -> Request:
    if not argv:
        raise UsageError("missing verb")
    verb, rest = argv[0], argv[1:]
    if verb == "admin" and rest:
        verb, rest = f"admin-{rest[0]}", rest[1:]
    if verb not in VERBS:
        raise UsageError(f"unknown verb {verb[:40]!r}")
    valued, bare, wants_name, wants_opts = VERBS[verb]
    req = Request(verb)
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            if not wants_opts:
                raise UsageError(f"{verb} takes no VM options")
            req.options = rest[i + 1 :]
            break
        if tok in valued:
            if i + 1 >= len(rest) or tok in req.flags:
                raise UsageError(f"{tok} needs one value")
            req.flags[tok] = rest[i + 1]
            i += 2
            continue
        if tok in bare:
            req.flags[tok] = ""
            i += 1
            continue
        if tok.startswith("-"):
            raise UsageError(f"{verb}: unknown flag {tok[:40]!r}")
        if not wants_name or req.name is not None:
            raise UsageError(f"{verb}: unexpected argument {tok[:40]!r}")
        req.name = tok
        i += 1
    if wants_name and req.name is None:
        raise UsageError(f"{verb} needs a VM name")
    return req


def emit(data: object, text: str, as_json: bool) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n" if as_json else text)
    sys.stdout.flush()


def run(argv: list[str], environ: dict[str, str], paths: Paths) -> int:
    who = caller.identify(environ)
    req = parse(argv)
    try:
        if req.verb == "pam-hook":
            if not who.is_root or who.via_sudo:
                raise PermissionRefused("pam-hook is run by pam_exec only")
            from . import logon

            return logon.hook(environ, paths)
        if req.verb.startswith("gated-"):
            from . import gate

            return gate.run(req, who, paths)
        if req.verb.startswith("admin-"):
            if not who.is_root:
                raise PermissionRefused("admin commands are for root only")
            from . import admin  # root-only code stays off the users' path

            return admin.run(req, who, paths)
        from . import vmctl

        return vmctl.run(req, who, paths)
    except KvmgateError as err:
        audit.record(
            paths.audit_log,
            caller=who.name,
            uid=who.uid,
            verb=req.verb,
            vm=req.name,
            owner=req.flag("--owner"),
            options=req.options,
            outcome="refused",
            reason=str(err),
            exit=err.exit_code,
        )
        raise


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)  # read what sudo vouches for, then drop everything
    try:
        caller.scrub()
        return run(args, environ, installed())
    except UsageError as err:
        sys.stderr.write(f"kvmgate: {err} (see kvmgate --help)\n")
        return err.exit_code
    except KvmgateError as err:
        sys.stderr.write(f"kvmgate: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - one line, never a traceback to the user
        sys.stderr.write(f"kvmgate: internal error: {type(err).__name__}: {err}\n")
        return 1
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
