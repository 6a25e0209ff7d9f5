"""`kvmgate`: what users and admins type.

The front end runs with the caller's own rights and holds no authority: it
checks usage, makes relative file paths absolute in the caller's cwd, and then
executes the root-owned helper, through `sudo -n` for ordinary users. The helper
re-checks everything; nothing here is trusted.
"""

from __future__ import annotations

import os
import sys

from kvmgate.errors import EXIT_REFUSED, EXIT_USAGE, EXIT_WRONG_STATE

# The front end's hot path imports nothing but os and sys (typing alone would add
# milliseconds to every command); argparse and the policy table load only for help.


def absolutize(tokens: list[str]) -> list[str]:
    """Paths are the caller's: resolve relative ones in the caller's cwd. Protocol
    prefixes are refused here with a clear message (the helper refuses them too)."""
    from kvmgate.model.policy import grammar
    from kvmgate.model.policy.table import OPTIONS

    path_options = {n for n, o in OPTIONS.items() if o.parse is grammar.parse_path}
    out = list(tokens)
    for i in range(len(out) - 1):
        if out[i] in path_options:
            v = out[i + 1]
            if grammar.looks_like_protocol(v):
                raise SystemExit(_refuse(f"{out[i]}: protocol prefixes are not allowed ({v.split(':', 1)[0]}:)"))
            if not v.startswith("/") and not v.startswith("-"):
                try:
                    cwd = os.getcwd()
                except FileNotFoundError:
                    raise SystemExit(_refuse(f"{out[i]}: {v} is relative, and the current directory is gone")) from None
                out[i + 1] = os.path.join(cwd, os.path.expanduser(v))
    return out


def absolutize_file(args: list[str]) -> list[str]:
    """A verb's FILE (`admin image add NAME FILE`, `admin import`) is the
    caller's path: resolve it in the caller's cwd, as `absolutize` does options."""
    from kvmgate.errors import UsageError
    from kvmgate.model.commands import verb_of

    try:
        verb, rest = verb_of(args)
    except UsageError:
        return list(args)  # the helper says what is wrong
    if "FILE" not in verb.args:
        return list(args)
    out = list(args)
    start = len(args) - len(rest)
    positional = 0
    i = 0
    while i < len(rest):
        spec = verb.flag(rest[i])
        if spec is not None:
            i += 1 if spec.metavar is None else 2
            continue
        if positional == 1 and not rest[i].startswith("/"):
            out[start + i] = os.path.abspath(os.path.expanduser(rest[i]))
        positional += 1
        i += 1
    return out


def _refuse(msg: str) -> int:
    sys.stderr.write(f"kvmgate: {msg}\n")
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    vm_options: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, vm_options = args[:cut], args[cut + 1 :]
    if not args or any(a in ("-h", "--help", "--version") for a in args):
        # Help is the only thing argparse is loaded for: every other word is parsed,
        # strictly, by the helper, which must not trust this process anyway.
        from kvmgate.cli.help import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            return EXIT_USAGE if e.code else 0
        return EXIT_USAGE
    if args[0] == "ssh":
        return ssh(args[1:], vm_options)
    helper_argv = absolutize_file(args)
    if vm_options:
        helper_argv += ["--", *absolutize(vm_options)]
    return exec_helper(helper_argv)


def ssh_argv(port: int, host: str, owner: str, name: str, extra: list[str]) -> list[str]:
    """ssh(1)'s argv. The user's words go after the destination: OpenSSH reads
    options there too (it restarts option parsing after the host), and the first
    word that is not an option starts the remote command, so no table of ssh's
    option letters is needed here. Ours come first, and ssh keeps the first value
    it is given for an option, so the port and host key alias cannot be overridden.

    Host keys: each VM has its own known_hosts entry, under its alias, whatever
    port it has today. The first key is taken without a prompt (accept-new): the
    helper has just checked that the port is held by this very VM's QEMU, so
    nobody else can be answering. A changed key is refused as ssh always does
    (a VM made afresh under the same name: `ssh-keygen -R kvmgate-OWNER-NAME`)."""
    return ["ssh", "-p", str(port), "-o", f"HostKeyAlias=kvmgate-{owner}-{name}",
            "-o", "StrictHostKeyChecking=accept-new", host, *extra]  # fmt: skip


def ssh(args: list[str], extra: list[str]) -> int:
    import json
    import subprocess

    owner: list[str] = []
    if len(args) == 3 and args[0] == "--owner":
        owner, args = args[:2], args[2:]
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("kvmgate: usage: kvmgate ssh [--owner USER] NAME [-- SSH-ARGUMENT...]\n")
        return EXIT_USAGE
    name = args[0]
    p = subprocess.run(
        [*_helper_command(), "ports", name, *owner, "--json"], capture_output=True, text=True, check=False
    )
    if p.returncode:
        sys.stderr.write(p.stderr)
        return p.returncode
    rows = json.loads(p.stdout)
    row = next((r for r in rows if r["service"] == "ssh"), None) or next(
        (r for r in rows if r["guest_port"] == 22), None
    )
    if row is None:
        sys.stderr.write(f"kvmgate: {name} has no forwarded ssh port (the admin adds one with --forward ssh)\n")
        return EXIT_REFUSED
    if not row.get("held"):
        # Stopped (nothing, or another user's program, may listen there) or the port is
        # someone else's: never hand the owner's connection to a squatter.
        sys.stderr.write(
            f"kvmgate: {name}: its ssh port {row['port']} is not held by the VM (is it running?); not connecting\n"
        )
        return EXIT_WRONG_STATE
    host = "127.0.0.1" if row["host"] == "0.0.0.0" else row["host"]  # noqa: S104 - reach a public port locally
    import pwd

    who = owner[1] if owner else pwd.getpwuid(os.getuid()).pw_name
    argv = ssh_argv(row["port"], host, who, name, extra)
    if row.get("node"):  # a Slurm node: through the VM's job, never a node's public address
        import shlex

        proxy = shlex.join([sys.argv[0] if os.path.isabs(sys.argv[0]) else "kvmgate", "tunnel", *owner, name, "ssh"])
        argv[1:1] = ["-o", f"ProxyCommand={proxy}"]
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        sys.stderr.write(f"kvmgate: cannot run ssh: {err.strerror}\n")
    return 1


def _helper_command() -> list[str]:
    """How this process reaches the helper of its own installation: directly as
    root, through `sudo -n` (never a password prompt) for everyone else."""
    import importlib

    try:
        paths = importlib.import_module("kvmgate._install").PATHS
        sudo, helper = str(paths["sudo"]), str(paths["helper"])
    except ImportError:
        from kvmgate.paths import Paths

        sudo, helper = Paths().sudo, Paths().helper
    return [helper] if os.geteuid() == 0 else [sudo, "-n", "--", helper]


def exec_helper(argv: list[str]) -> int:
    if os.geteuid() == 0 and os.getuid() == 0:
        # Root needs no sudo hop: run the helper of this same installation in-process.
        # Root is root: a shell that came from sudo (`sudo -i`, Cockpit's administrative
        # access) must not make it act as the user who ran sudo. Only root and those the
        # host's sudoers lets run anything as root get here; the kvmgate drop-in gives
        # users the helper alone, which still reads SUDO_UID.
        for key in ("SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND"):
            os.environ.pop(key, None)
        from kvmgate.entry import main as helper_main

        return helper_main(argv)
    cmd = [*_helper_command(), *argv]
    try:
        os.execv(cmd[0], cmd)
    except OSError as err:
        sys.stderr.write(f"kvmgate: cannot run {cmd[0]}: {err.strerror}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
