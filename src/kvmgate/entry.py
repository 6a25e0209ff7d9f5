"""kvmgate-helper: the privileged path, one straight line.

    scrub (fds, env, umask, cwd, rlimits, groups)           host.caller.scrub
    -> identify the caller (real uid, or SUDO_UID under sudo) host.caller.identify
    -> parse argv strictly, from the one verb table          model.commands.parse
    -> dispatch to the verb's module                         verbs.*
         (policy, VM resolution, typed allowlist, opening with the owner's
          rights, fork, drop, exec: ops.lifecycle, host.launch)
    -> audit the outcome, map the error to its exit code

All of it inside one `try`: every refusal, usage errors and failed
identification included, and every internal error is one line on stderr (one
JSON object on stdout too with --json), a stable exit code, and an audit
record. Verb modules are imported only when their verb is called: each import
costs start-up time (docs/architecture.md, "Start-up budget").
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys
from typing import Any

from kvmgate.errors import EXIT_INTERNAL, KvmgateError, PermissionRefused, UsageError, one_line
from kvmgate.host import caller, output
from kvmgate.model.commands import Request, parse
from kvmgate.paths import Paths, installed
from kvmgate.store import critical

# Which module carries each verb; each is imported only when its verb is called.
ROUTES: dict[str, str] = {
    "start": "lifecycle",
    **dict.fromkeys(("stop", "reset", "freeze", "thaw", "hibernate", "snapshot"), "power"),
    **dict.fromkeys(("status", "list", "ports", "vnc", "tunnel"), "info"),
    **dict.fromkeys(("console", "log"), "console"),
    **dict.fromkeys(
        ("images", "keys", "admin-import", "admin-image-add", "admin-image-list", "admin-image-remove"), "images"
    ),
    **dict.fromkeys(("gated-config", "gated-wake", "gated-hold", "gated-idle", "gated-used"), "wake"),
    **dict.fromkeys(("templates", "create", "delete", "quota", "admin-grant", "admin-quota"), "selfservice"),
    **{f"admin-template-{v}": "selfservice" for v in ("add", "remove", "list", "check")},
    **dict.fromkeys(("admin-reap", "admin-sessions"), "logon"),  # root-only code stays off the users' path
    **dict.fromkeys(("admin-autostart", "admin-watch"), "services"),
    **dict.fromkeys(("admin-shutdown", "admin-boot"), "hostpower"),
    **dict.fromkeys(("slurm-job", "admin-move", "admin-evacuate"), "cluster"),
}


def dispatch(req: Request, who: caller.Caller, paths: Paths) -> int:
    if req.verb.startswith("admin-") and not who.is_root:
        raise PermissionRefused("admin commands are for root only")
    module = ROUTES.get(req.verb) or ("admin" if req.verb.startswith("admin-") else "")
    if not module:
        raise UsageError(f"unknown verb {req.verb}")
    import importlib

    verb: Any = importlib.import_module(f"kvmgate.verbs.{module}")
    return int(verb.run(req, who, paths))


def _wants_json(req: Request | None, args: list[str]) -> bool:
    """--json, also when the request did not parse (a flag before `--` only)."""
    if req is not None:
        return req.as_json
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def main(argv: list[str] | None = None, paths: Paths | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)  # read what sudo vouches for, then drop everything
    who: caller.Caller | None = None
    req: Request | None = None
    output.install()  # root never writes to its caller itself (host.output)
    try:
        paths = paths or installed()  # fixed at install time: known before anything can be refused
        caller.scrub()
        who = caller.identify(environ)
        output.set_caller(who.uid, pwd.getpwuid(who.uid).pw_gid)
        req = parse(args)
        code = dispatch(req, who, paths)
        output.finish()
        return code
    except KvmgateError as err:
        code, message = err.exit_code, str(err)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception as err:  # noqa: BLE001 - one line, never a traceback to the user
        code, message = EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err}"
    line = one_line(message)
    with critical.section(), contextlib.suppress(Exception):  # the caller's signal cannot keep it out of the log
        _audit(paths, who, req, args, code, line)
    if _wants_json(req, args):
        sys.stdout.write(json.dumps({"error": line, "exit": code}) + "\n")
    hint = " (see kvmgate --help)" if code == UsageError.exit_code else ""
    sys.stderr.write(f"kvmgate: {line}{hint}\n")
    output.finish()
    return code


def _audit(
    paths: Paths | None, who: caller.Caller | None, req: Request | None, args: list[str], code: int, reason: str
) -> None:
    """Every refusal and internal error, also those before the request parsed."""
    if paths is None:
        return
    verb = req.verb if req else (args[0][:40] if args else "")
    from kvmgate.host import audit_rate

    audit_rate.refusal(  # rate-limited per caller: a loop of refusals cannot flood the log
        paths.audit_log,
        who.uid if who else os.getuid(),
        audit_rate.rate_for(paths),
        caller=who.name if who else None,
        verb=verb,
        vm=req.name if req else None,
        owner=req.flag("--owner") if req else None,
        options=list(req.options) if req else None,
        outcome="refused" if code not in (EXIT_INTERNAL, 130) else "error",
        reason=reason,
        exit=code,
    )


if __name__ == "__main__":
    sys.exit(main())
