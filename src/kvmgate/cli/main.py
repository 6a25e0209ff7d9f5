"""`kvmgate`: what users and admins type.

The front end runs with the caller's own rights and holds no authority: it
checks usage, makes relative file paths absolute in the caller's cwd, and then
executes the root-owned helper, through `sudo -n` for ordinary users. The helper
re-checks everything; nothing here is trusted.
"""

from __future__ import annotations

import os
import sys

from .. import __version__
from ..errors import EXIT_REFUSED, EXIT_USAGE

# The front end's hot path imports nothing but os and sys (typing alone would add
# milliseconds to every command); argparse and the policy table load only when needed.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

EPILOG = """\
exit status:
  0  ok
  1  internal error
  2  usage error
  3  refused by policy or permission
  4  no such VM for this caller (also when it exists but belongs to someone else)
  5  wrong state (already running, not running, already exists)

files:
  /etc/kvmgate/policy.toml   the admin's policy (root-owned)
  /var/lib/kvmgate/          VM identities, disks, logs (see docs/layout.md)
  /run/kvmgate/              root-only runtime state: QMP and console sockets, locks
  /run/kvmgate-display/      VNC sockets, each in a directory only its VM's owner can enter
  docs/networks.md           networks, forwarded ports, VNC (installed under /usr/local/share/doc/kvmgate)
"""


def _options_help() -> str:
    from ..policy.table import OPTIONS

    rows = []
    for lname in ("user", "admin", "unused"):
        rows.append(f"  {lname}:")
        for n, o in OPTIONS.items():
            if o.default == lname:
                rows.append(f"    {n:<14} {o.summary}")
    return "\n".join(rows)


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, usage: str | None
) -> argparse.ArgumentParser:
    import argparse

    return sub.add_parser(
        name,
        help=help,
        description=help,
        usage=usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="kvmgate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run your own KVM virtual machines, defined for you by the administrator, "
        "through a small secure wrapper. Each VM runs as its owner, with the options the "
        "administrator fixed; users may add only the options their list allows.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"kvmgate {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    def cmd(name: str, help: str, usage: str | None = None) -> argparse.ArgumentParser:
        return _subcommand(sub, name, help, usage)

    def owner(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--owner", metavar="USER", help="act on USER's VM (root only)")

    sp = cmd("list", "list your VMs (or, with --services, the service VMs everyone may use)")
    owner(sp)
    sp.add_argument("--services", action="store_true", help="list the host's service VMs")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = cmd(
        "start",
        "start a VM, optionally with options from your list",
        usage="kvmgate start [--owner USER] [--paused] NAME [-- OPTION...]",
    )
    sp.epilog = (
        "VM options (the design note's vocabulary; the policy may move them):\n" + _options_help() + "\n\n" + EPILOG
    )
    owner(sp)
    sp.add_argument("--paused", action="store_true", help="start with the virtual CPUs stopped")
    sp.add_argument("name", metavar="NAME")

    sp = cmd("stop", "stop a VM: ACPI power-down, then kill after the timeout")
    owner(sp)
    sp.add_argument("--force", action="store_true", help="quit at once instead of powering down")
    sp.add_argument("--timeout", metavar="SECONDS", help="power-down grace time (default from the policy)")
    sp.add_argument("name", metavar="NAME")

    def on_vm(name: str, help: str, reads: bool = False) -> argparse.ArgumentParser:
        """A command on one VM; one that only reads also takes --json."""
        sp = cmd(name, help)
        owner(sp)
        if reads:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("name", metavar="NAME")
        return sp

    on_vm("freeze", "pause a VM's virtual CPUs; its memory stays in place")
    on_vm("thaw", "resume a frozen VM, or restore a hibernated one")
    on_vm("hibernate", "save the whole VM to its directory and end QEMU; start or thaw restores it")
    on_vm("status", "show a VM's state: running, paused, hibernated or stopped", reads=True)

    sp = cmd("console", "attach to a VM's serial console (detach with Ctrl-])")
    sp.epilog = (
        "The console shows up to 16 KiB of earlier output first. One attachment at a time;\n"
        "a second attach is refused with exit 5.\n\n" + EPILOG
    )
    owner(sp)
    sp.add_argument("--expect", metavar="REGEX", help="exit 0 as soon as the output matches REGEX")
    sp.add_argument("--timeout", metavar="SECONDS", help="give up (or, without --expect, detach) after SECONDS")
    sp.add_argument("name", metavar="NAME")

    on_vm("ports", "show a VM's forwarded host ports (admin create --forward, -redir)", reads=True)

    sp = cmd(
        "ssh",
        "ssh into a VM through its forwarded ssh port",
        usage="kvmgate ssh [--owner USER] NAME [-- SSH-OPTION... [COMMAND...]]",
    )
    sp.epilog = (
        "Runs ssh(1) as you, to the host port kvmgate forwards to the guest's port 22\n"
        "(the forward named ssh, or else the one to guest port 22). Arguments after --\n"
        "go to ssh: options first, then an optional remote command. The host key is\n"
        "remembered under the alias kvmgate-OWNER-NAME, so VMs never clash in known_hosts.\n"
        "Example: kvmgate ssh dev -- -l root uptime\n\n" + EPILOG
    )
    owner(sp)
    sp.add_argument("name", metavar="NAME")

    on_vm("vnc", "show how to reach a running VM's display (a socket only you can open, or a port and password)", True)

    ap = cmd("admin", "host and VM administration (root only)")
    asub = ap.add_subparsers(dest="admin_verb", metavar="ADMIN-COMMAND", required=True)

    def acmd(name: str, help: str, usage: str | None = None) -> argparse.ArgumentParser:
        return _subcommand(asub, name, help, usage)

    a = acmd(
        "init",
        "idempotent host set-up: directories, the kvmgate-qemu group, the default policy, "
        "/dev/kvm and /dev/net/tun permissions",
    )
    a.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="set the policy's accelerator")
    a.add_argument("--pam", action="store_true", help="install the PAM session hook in common-session (docs/logon.md)")
    a.add_argument("--no-pam", action="store_true", help="remove the PAM session hook")
    a = acmd(
        "create",
        "define a VM for a user",
        usage="kvmgate admin create NAME (--owner USER | --service) [--disk-size SIZE] -- OPTION...",
    )
    a.epilog = "VM options:\n" + _options_help() + "\n\n" + EPILOG
    a.add_argument("--owner", metavar="USER", help="the VM's owner (for --service: default kvmgate-svc)")
    a.add_argument("--service", action="store_true", help="a service VM: listed for all users, started at boot")
    a.add_argument("--no-autostart", action="store_true", help="with --service: do not start it at boot")
    a.add_argument("--disk-size", metavar="SIZE", help="create the VM's default disk (qcow2), e.g. 10G")
    a.add_argument(
        "--on-logoff",
        choices=("none", "pause", "hibernate"),
        help="what happens to the VM when its owner's last session closes",
    )
    _network_flags(a)
    a.add_argument("name", metavar="NAME")
    a = acmd("delete", "delete a VM (it must be stopped); frees its ports, MACs and addresses")
    a.add_argument("--owner", metavar="USER", required=True)
    a.add_argument("--keep-disks", action="store_true", help="keep the disks directory under STATE/kept/")
    a.add_argument("name", metavar="NAME")
    a = acmd("set", "change a VM's settings (they apply from its next start)")
    a.add_argument("--owner", metavar="USER", required=True)
    a.add_argument(
        "--on-logoff",
        choices=("none", "pause", "hibernate"),
        help="what happens to the VM when its owner's last session closes",
    )
    a.add_argument("--idle", metavar="SECONDS", help="with --wake on: freeze after this long without connections")
    _network_flags(a)
    a.add_argument("name", metavar="NAME")
    acmd(
        "net-up",
        "idempotent network set-up: services bridges, the nftables rules, dnsmasq (run at boot by "
        "kvmgate-network.service; starts of bridged VMs do it themselves after a reboot)",
    )
    acmd("net-down", "stop dnsmasq, remove kvmgate's nftables tables and its bridges that have no ports")
    acmd("reap", "apply the logoff policy for sessions that ended without closing (run by a timer)")
    acmd("autostart", "start every service VM marked autostart (run at boot)")
    a = acmd("watch", "start a service VM and wait for it; exit 1 if QEMU dies (kvmgate-vm@.service)")
    a.add_argument("name", metavar="OWNER:NAME")
    a = acmd("list", "list every VM")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a = acmd("show", "show a VM's identity, options and QEMU command line")
    a.add_argument("--owner", metavar="USER", required=True)
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("name", metavar="NAME")
    return p


def _network_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument(
        "--network",
        metavar="NET[,NET...]",
        help="one NIC on each named network from the policy (user, private, services, ...)",
    )
    a.add_argument(
        "--forward",
        metavar="SPEC[,SPEC...]",
        help="forward host ports from the pool to the guest: ssh, http, NAME=GUESTPORT, GUESTPORT, each with "
        "an optional @HOSTPORT inside the pool; none removes them",
    )
    a.add_argument(
        "--wake",
        choices=("on", "off"),
        help="kvmgate-gated owns the forwarded ports and wakes a frozen, hibernated or stopped VM on a connection",
    )


def absolutize(tokens: list[str]) -> list[str]:
    """Paths are the caller's: resolve relative ones in the caller's cwd. Protocol
    prefixes are refused here with a clear message (the helper refuses them too)."""
    from ..policy import grammar
    from ..policy.table import OPTIONS

    path_options = {n for n, o in OPTIONS.items() if o.parse is grammar.parse_path}
    out = list(tokens)
    for i in range(len(out) - 1):
        if out[i] in path_options:
            v = out[i + 1]
            if grammar.looks_like_protocol(v):
                raise SystemExit(_refuse(f"{out[i]}: protocol prefixes are not allowed ({v.split(':', 1)[0]}:)"))
            if not v.startswith("/") and not v.startswith("-"):
                out[i + 1] = os.path.join(os.getcwd(), os.path.expanduser(v))
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
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            return EXIT_USAGE if e.code else 0
        return EXIT_USAGE
    if args[0] == "ssh":
        return ssh(args[1:], vm_options)
    helper_argv = list(args)
    if vm_options:
        helper_argv += ["--", *absolutize(vm_options)]
    return exec_helper(helper_argv)


# ssh(1)'s option letters that take a value (OpenSSH 9); every other letter is a flag.
SSH_VALUED = "BbcDEeFIiJLlmOoPpQRSWw"


def split_ssh_args(args: list[str]) -> tuple[list[str], list[str]]:
    """ssh's options, then the remote command (the first word that is not an option)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args[:i], args[i + 1 :]
        if not a.startswith("-") or a == "-":
            break
        j = 1
        while j < len(a):
            if a[j] in SSH_VALUED:
                if j == len(a) - 1:
                    i += 1  # the value is the next word
                break
            j += 1
        i += 1
    return args[:i], args[i:]


def ssh(args: list[str], extra: list[str]) -> int:
    import json
    import subprocess

    owner: list[str] = []
    if len(args) == 3 and args[0] == "--owner":
        owner, args = args[:2], args[2:]
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("kvmgate: usage: kvmgate ssh [--owner USER] NAME [-- SSH-OPTION... [COMMAND...]]\n")
        return EXIT_USAGE
    name = args[0]
    sudo, helper = _sudo_and_helper()
    cmd = [helper] if os.geteuid() == 0 else [sudo, "-n", "--", helper]
    p = subprocess.run([*cmd, "ports", name, *owner, "--json"], capture_output=True, text=True, check=False)
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
    host = "127.0.0.1" if row["host"] == "0.0.0.0" else row["host"]  # noqa: S104 - reach a public port locally
    import pwd

    who = owner[1] if owner else pwd.getpwuid(os.getuid()).pw_name
    options, command = split_ssh_args(extra)
    argv = ["ssh", "-p", str(row["port"]), "-o", f"HostKeyAlias=kvmgate-{who}-{name}", *options, host, *command]
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        sys.stderr.write(f"kvmgate: cannot run ssh: {err.strerror}\n")
    return 1


def _sudo_and_helper() -> tuple[str, str]:
    import importlib

    try:
        paths = importlib.import_module("kvmgate._install").PATHS
    except ImportError:
        from ..paths import Paths

        return Paths().sudo, Paths().helper
    return str(paths["sudo"]), str(paths["helper"])


def exec_helper(argv: list[str]) -> int:
    if os.geteuid() == 0 and os.getuid() == 0:
        # Root needs no sudo hop: run the helper of this same installation in-process.
        from ..helper.main import main as helper_main

        return helper_main(argv)
    sudo, helper = _sudo_and_helper()
    cmd = [sudo, "-n", "--", helper, *argv]
    try:
        os.execv(cmd[0], cmd)
    except OSError as err:
        sys.stderr.write(f"kvmgate: cannot run {cmd[0]}: {err.strerror}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
