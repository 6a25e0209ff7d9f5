"""Every verb kvmgate knows, described once. Pure.

No dataclasses: `dataclasses` pulls in `inspect`, which alone costs the helper
several milliseconds of its start-up budget.

Both parsers come from this table: the helper's strict one (`parse`, below: no
abbreviations, no `--flag=value`, each flag at most once) and the front end's
`--help` (`kvmgate.cli.help` builds argparse from it). A unit test walks the
table through both, so they cannot drift apart.

`Request` is what the helper acts on: the verb, the VM name, the flags given
(by their names in this table) and the VM options after `--`. Internal
callers (the PAM worker, gated, the reaper) never build a `Request`: they call
the operations in `kvmgate.ops` with typed arguments.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmgate.errors import UsageError


class Flag:
    """One flag of a verb. (Plain slotted classes here: a NamedTuple class costs
    the helper's start-up ten times as much to create.)"""

    __slots__ = ("choices", "help", "metavar", "name", "required")

    def __init__(
        self,
        name: str,  # "--owner"
        help: str,
        metavar: str | None = None,  # None: a flag without a value
        choices: tuple[str, ...] = (),
        required: bool = False,
    ) -> None:
        self.name, self.help, self.metavar, self.choices, self.required = name, help, metavar, choices, required


class Verb:
    __slots__ = (
        "args", "epilog", "flags", "frontend", "help", "internal", "name", "options", "target", "target_optional",
        "usage",
    )  # fmt: skip

    def __init__(
        self,
        name: str,  # the helper's verb: "start", "admin-create", "gated-wake"
        help: str,
        flags: tuple[Flag, ...] = (),
        target: str | None = "NAME",  # the positional argument's metavar; None: takes none
        options: bool = False,  # takes `-- OPTION...`
        usage: str | None = None,
        epilog: str = "",  # extra help text; "{options}" is replaced by the option lists
        internal: bool = False,  # called by kvmgate's own programs (pam_exec, gated), not shown in help
        frontend: bool = False,  # handled by the front end itself (ssh), never sent to the helper
        args: tuple[str, ...] = (),  # positionals after NAME (`snapshot NAME TAG`), kept as flags by metavar
        target_optional: bool = False,  # the positional may be left out (`admin quota [USER]`)
    ) -> None:
        self.name, self.help, self.flags, self.target, self.options = name, help, flags, target, options
        self.usage, self.epilog, self.internal, self.frontend, self.args = usage, epilog, internal, frontend, args
        self.target_optional = target_optional

    @property
    def words(self) -> tuple[str, ...]:
        """What a user types: ("admin", "create") for "admin-create", ("admin",
        "image", "add") for "admin-image-add"."""
        for group in GROUPS:
            if self.name.startswith(f"admin-{group}-"):
                return ("admin", group, self.name.removeprefix(f"admin-{group}-"))
        return tuple(self.name.split("-", 1)) if self.name.startswith("admin-") else (self.name,)

    def flag(self, name: str) -> Flag | None:
        return next((f for f in self.flags if f.name == name), None)


GROUPS = ("image", "template")  # admin verb groups of three words: `kvmgate admin image add`

OWNER = Flag("--owner", "act on USER's VM (root only)", "USER")
FORMAT = Flag(
    "--format",
    "the file's format; needed when its name does not say (.img, .bin, no suffix); its header must agree",
    "FORMAT",
    ("qcow2", "raw"),
)
JSON = Flag("--json", "machine-readable output (errors too: one JSON object on stdout)")
OWNER_REQUIRED = Flag("--owner", "the VM's owner", "USER", required=True)
ON_LOGOFF = Flag(
    "--on-logoff",
    "what happens to the VM when its owner's last session closes",
    "MODE",
    ("none", "pause", "hibernate"),
)
LOGOFF_DELAY = Flag(
    "--logoff-delay",
    "act on --on-logoff only after the owner has had no session this long (default: the policy's "
    "logoff_delay_seconds, 60); a logon within it cancels it",
    "SECONDS",
)
TIMEOUT_TOTAL = Flag(
    "--timeout", "the bound on the whole of it (default 300); what is not done by then is killed", "SECONDS"
)
NETWORK = Flag(
    "--network", "one NIC on each named network from the policy (user, private, services, ...)", "NET[,NET...]"
)
FORWARD = Flag(
    "--forward",
    "forward host ports from the pool to the guest: ssh, http, NAME=GUESTPORT, GUESTPORT, each with "
    "an optional @HOSTPORT inside the pool; none removes them",
    "SPEC[,SPEC...]",
)
WAKE = Flag(
    "--wake",
    "kvmgate-gated owns the forwarded ports and wakes a frozen, hibernated or stopped VM on a connection",
    "on|off",
    ("on", "off"),
)
GUEST_AGENT = Flag(
    "--guest-agent",
    "a channel to the guest's qemu-guest-agent, for kvmgate alone: it sets the guest's clock after thaw and restore",
    "on|off",
    ("on", "off"),
)
OWNER_MAP = Flag(
    "--owner-map",
    "a service VM reads the owner map of its services networks (which owner holds each address) from a "
    "read-only disk kvmgate keeps current, and says which map it applied (docs/services.md)",
    "on|off",
    ("on", "off"),
)
TIMEOUT = Flag("--timeout", "power-down grace time in seconds (default from the policy)", "SECONDS")
ON_PRESSURE = Flag(
    "--on-pressure",
    "when a start would pass a running-memory budget (the owner's or the host's), may kvmgate hibernate this VM "
    "to make room if it is the least recently used? (default refuse)",
    "MODE",
    ("refuse", "hibernate"),
)
DISK_SIZE = Flag("--disk-size", "the VM's disk, e.g. 10G; with an image, at least its size", "SIZE")

VERBS: tuple[Verb, ...] = (
    Verb(
        "list",
        "list your VMs (or, with --services, the service VMs everyone may use)",
        (OWNER, Flag("--services", "list the host's service VMs"), JSON),
        target=None,
    ),
    Verb(
        "start",
        "start a VM, optionally with options from your list; a hibernated VM is restored",
        (OWNER, Flag("--paused", "start with the virtual CPUs stopped")),
        options=True,
        usage="kvmgate start [--owner USER] [--paused] NAME [-- OPTION...]",
        epilog="VM options (the design note's vocabulary; the policy may move them):\n{options}",
    ),
    Verb(
        "stop",
        "stop a VM: ACPI power-down, then kill after the timeout (exit 6 if it had to kill)",
        (
            OWNER,
            Flag("--force", "quit at once instead of powering down"),
            TIMEOUT,
            Flag("--discard", "a hibernated VM: throw its saved state away (its next start boots afresh)"),
        ),
    ),
    Verb(
        "snapshot",
        "save a running or paused VM's whole state (memory and qcow2 disks) as TAG; "
        "`kvmgate start NAME -- -loadvm TAG` starts from it",
        (
            OWNER,
            Flag("--list", "list the VM's snapshots"),
            Flag("--delete", "delete the snapshot TAG", "TAG"),
            JSON,
        ),
        args=("TAG",),
        usage="kvmgate snapshot NAME TAG | NAME --list [--json] | NAME --delete TAG",
    ),
    Verb("reset", "hard-reset a running VM, like its reset button (the guest does not shut down)", (OWNER,)),
    Verb("freeze", "pause a VM's virtual CPUs; its memory stays in place", (OWNER,)),
    Verb("thaw", "resume a frozen VM, or restore a hibernated one", (OWNER,)),
    Verb("hibernate", "save the whole VM to its directory and end QEMU; start or thaw restores it", (OWNER,)),
    Verb("status", "show a VM's state: running, paused, hibernated or stopped", (OWNER, JSON)),
    Verb(
        "console",
        "attach to a VM's serial console (detach with Ctrl-])",
        (
            OWNER,
            Flag("--expect", "exit 0 as soon as the output matches REGEX", "REGEX"),
            Flag("--timeout", "give up (or, without --expect, detach) after SECONDS", "SECONDS"),
        ),
        epilog="The console shows up to 16 KiB of earlier output first. One attachment at a time;\n"
        "a second attach is refused with exit 5.",
    ),
    Verb(
        "log",
        "show a VM's console log, also after it stopped (control characters made visible)",
        (
            OWNER,
            Flag("--previous", "the run before the last start (why a VM died, after a restart)"),
            Flag("--lines", "only the last N lines", "N"),
            Flag("--raw", "the guest's bytes as they are, escape sequences included"),
            Flag("--follow", "then keep showing new output until the VM stops (Ctrl-C ends it)"),
            JSON,
        ),
        epilog="The log is bounded as it is written (the policy's console_log_mib): past it, kvmgate keeps\n"
        "how the run began and its newest output, with a line saying how much was dropped between.",
    ),
    Verb("ports", "show a VM's forwarded host ports (admin create --forward, -redir)", (OWNER, JSON)),
    Verb(
        "tunnel",
        "join standard input and output to a running VM's ssh port or display, on whichever node it runs "
        "(an ssh ProxyCommand: kvmgate ssh uses it on a Slurm cluster)",
        (OWNER,),
        args=("SERVICE",),
        usage="kvmgate tunnel [--owner USER] NAME ssh|vnc",
        epilog="Example: ssh -o ProxyCommand='kvmgate tunnel dev ssh' -o HostKeyAlias=kvmgate-alice-dev root@dev",
    ),
    Verb(
        "ssh",
        "ssh into a VM through its forwarded ssh port",
        (OWNER,),
        options=True,
        usage="kvmgate ssh [--owner USER] NAME [-- SSH-ARGUMENT...]",
        epilog="Runs ssh(1) as you, to the host port kvmgate forwards to the guest's port 22\n"
        "(the forward named ssh, or else the one to guest port 22). Arguments after -- go to\n"
        "ssh after the destination, where OpenSSH reads options as well as the remote command.\n"
        "The host key is remembered under the alias kvmgate-OWNER-NAME, so VMs never clash in\n"
        "known_hosts whatever port they get; the first key is taken without a prompt, because the\n"
        "port has just been checked to be this VM's own. A VM made afresh under the same name has\n"
        "a new key, which ssh refuses: ssh-keygen -R kvmgate-OWNER-NAME.\n"
        "Example: kvmgate ssh dev -- -l root uptime",
        frontend=True,
    ),
    Verb(
        "vnc",
        "show how to reach a running VM's display (a socket only you can open, or a port and password)",
        (OWNER, JSON),
    ),
    Verb(
        "admin-init",
        "idempotent host set-up: directories, the kvmgate-qemu group, the default policy, "
        "/dev/kvm and /dev/net/tun permissions",
        (
            Flag("--accel", "set the policy's accelerator", "auto|kvm|tcg", ("auto", "kvm", "tcg")),
            Flag(
                "--backend",
                "where VMs run: this host (local, the default) or Slurm jobs on the cluster's nodes (slurm; "
                "refused while any VM runs or is hibernated; docs/cluster.md)",
                "local|slurm",
                ("local", "slurm"),
            ),
            Flag("--partition", "with --backend slurm: the partition VMs' jobs go to", "NAME"),
            Flag("--pam", "install the PAM session hook in the sshd and login stacks (docs/logon.md)"),
            Flag("--no-pam", "remove the PAM session hook"),
            Flag("--cron", "without systemd: install cron lines for what its units run (reap, boot, gated)"),
            Flag("--no-cron", "remove those cron lines"),
            Flag(
                "--cockpit",
                "the web page: install cockpit-ws, cockpit-bridge and novnc, fetch xterm.js (pinned), enable "
                "cockpit.socket where systemd runs (docs/cockpit.md)",
            ),
        ),
        target=None,
    ),
    Verb(
        "admin-create",
        "define a VM for a user",
        (
            Flag("--owner", "the VM's owner (for --service: default kvmgate-svc)", "USER"),
            Flag("--service", "a service VM: listed for all users, started at boot"),
            Flag("--no-autostart", "with --service: do not start it at boot"),
            Flag(
                "--disk-size", "create the VM's default disk (qcow2), e.g. 10G; with --image, at least its size", "SIZE"
            ),
            Flag("--image", "the default disk is a copy-on-write overlay of this library image", "IMAGE"),
            Flag(
                "--cloud-init",
                "attach a cloud-init seed at each start (hostname, the owner's ssh keys, DHCP); "
                "default: as the image is marked",
                "on|off",
                ("on", "off"),
            ),
            ON_LOGOFF,
            LOGOFF_DELAY,
            ON_PRESSURE,
            NETWORK,
            FORWARD,
            WAKE,
            GUEST_AGENT,
            OWNER_MAP,
        ),
        options=True,
        usage="kvmgate admin create NAME (--owner USER | --service) [--image IMAGE] [--disk-size SIZE] -- OPTION...",
        epilog="VM options:\n{options}",
    ),
    Verb(
        "admin-delete",
        "delete a VM; frees its ports, MACs and addresses",
        (
            OWNER_REQUIRED,
            Flag("--keep-disks", "keep the disks directory under STATE/kept/"),
            Flag("--force", "also a running VM (ended at once) or a hibernated one (its saved state is lost)"),
        ),
    ),
    Verb(
        "admin-set",
        "change a VM's settings (they apply from its next start); with `-- OPTION...`, replace its QEMU "
        "options (a stopped VM: a new identity, its disks, settings and history kept)",
        (
            OWNER_REQUIRED,
            ON_LOGOFF,
            LOGOFF_DELAY,
            ON_PRESSURE,
            Flag("--idle", "with --wake on: freeze after this long without connections", "SECONDS"),
            NETWORK,
            FORWARD,
            WAKE,
            GUEST_AGENT,
            OWNER_MAP,
        ),
        options=True,
        usage="kvmgate admin set NAME --owner USER [SETTING...] [-- OPTION...]",
        epilog="VM options:\n{options}",
    ),
    Verb(
        "admin-net-up",
        "idempotent network set-up: services bridges, the nftables rules, dnsmasq (run at boot by "
        "kvmgate-network.service; starts of bridged VMs do it themselves after a reboot)",
        target=None,
    ),
    Verb(
        "admin-owner-map",
        "the owner map service VMs read: each services address with its owner and VM, the addresses held "
        "back until every live service VM has applied a map without them, and which map each has applied",
        (JSON,),
        target=None,
    ),
    Verb(
        "admin-net-down",
        "stop dnsmasq, remove kvmgate's nftables tables and its bridges that have no ports",
        target=None,
    ),
    Verb(
        "admin-sessions",
        "the logon sessions kvmgate counts; --watch follows logind's (kvmgate-sessions.service)",
        (Flag("--watch", "follow logind's sessions for ever, acting on first logons and last logoffs"), JSON),
        target=None,
    ),
    Verb("admin-reap", "apply the logoff policy for sessions that ended without closing (run by a timer)", target=None),
    Verb("admin-autostart", "start every service VM marked autostart (run at boot)", target=None),
    Verb(
        "admin-shutdown",
        "host going down: hibernate every running user VM (paused ones too) in parallel; a -snapshot VM is "
        "powered down (kvmgate-guests.service)",
        (TIMEOUT_TOTAL, Flag("--owner", "only this user's VMs", "USER")),
        target=None,
    ),
    Verb(
        "admin-boot",
        "host back: restore the VMs admin shutdown hibernated, each as it was (kvmgate-guests.service)",
        (TIMEOUT_TOTAL, Flag("--owner", "only this user's VMs", "USER")),
        target=None,
    ),
    Verb(
        "admin-watch",
        "start a service VM and wait for it; exit 7 if QEMU dies (kvmgate-vm@.service)",
        target="OWNER:NAME",
    ),
    Verb(
        "admin-resize",
        "grow a stopped VM's disk (a file in its disks/ directory, e.g. disk0.qcow2) to SIZE",
        (OWNER_REQUIRED,),
        args=("DISK", "SIZE"),
        usage="kvmgate admin resize NAME DISK SIZE --owner USER",
    ),
    Verb(
        "admin-import",
        "make FILE (an existing image) the stopped VM's disk: checked, converted to qcow2 as the owner "
        "(disks/disk0.qcow2)",
        (OWNER_REQUIRED, FORMAT, Flag("--replace", "replace the VM's existing default disk (it is deleted)")),
        args=("FILE",),
        usage="kvmgate admin import NAME FILE --owner USER [--format qcow2|raw] [--replace]",
    ),
    Verb(
        "admin-image-add",
        "add FILE to the image library as NAME: checked, converted to qcow2 (root-owned, read-only)",
        (
            FORMAT,
            Flag("--move", "take a root-owned qcow2 file on the same filesystem without copying it"),
            Flag("--cloud-init", "VMs made from it get a cloud-init seed at each start"),
        ),
        args=("FILE",),
        usage="kvmgate admin image add NAME FILE [--format qcow2|raw] [--move] [--cloud-init]",
    ),
    Verb("admin-image-list", "list the image library (path, sizes, the VMs using each)", (JSON,), target=None),
    Verb("admin-image-remove", "remove a library image no VM uses"),
    Verb("images", "list the images the administrator offers (name, size, cloud-init)", (JSON,), target=None),
    Verb("keys", "show which of your ssh keys a VM's cloud-init seed holds", (OWNER, JSON)),
    Verb("admin-list", "list every VM", (JSON,), target=None),
    Verb("admin-show", "show a VM's identity, options, settings and QEMU command line", (OWNER_REQUIRED, JSON)),
    Verb("templates", "list the templates the administrator granted you, and what each makes", (JSON,), target=None),
    Verb(
        "create",
        "make yourself a VM from a template the administrator granted you, within your quota",
        (Flag("--template", "the template (kvmgate templates)", "TEMPLATE", required=True), DISK_SIZE),
        usage="kvmgate create NAME --template TEMPLATE [--disk-size SIZE]",
        epilog="The VM is an ordinary kvmgate VM: start, stop, console, hibernate, delete it as any other.\n"
        "--disk-size may not exceed the template's max_disk_size; kvmgate quota shows what you may still use.",
    ),
    Verb(
        "delete",
        "delete a VM you made from a template (its disks too, unless --keep-disks)",
        (
            Flag("--keep-disks", "keep its disks directory under the state directory's kept/"),
            Flag("--force", "also a running VM (ended at once) or a hibernated one (its saved state is lost)"),
        ),
    ),
    Verb(
        "quota",
        "what your VMs use of your grant: VMs, memory, running memory, disk, ports",
        (OWNER, JSON),
        target=None,
    ),
    Verb(
        "admin-template-add",
        "add or replace a template users may make VMs from (VMs made earlier keep what they were made with)",
        (
            Flag("--image", "the VM's disk is an overlay of this library image", "IMAGE"),
            Flag("--disk-size", "the disk's size (an empty disk; with --image, at least the image's size)", "SIZE"),
            Flag("--max-disk-size", "the most a user may ask with create --disk-size", "SIZE"),
            NETWORK,
            Flag("--forward", "forwarded ports, as admin create --forward, without @HOSTPORT", "SPEC[,SPEC...]"),
            ON_LOGOFF,
            LOGOFF_DELAY,
            ON_PRESSURE,
            Flag(
                "--user-options",
                "the only user options its VMs' starts take (default: the policy's user list)",
                "OPT[,OPT...]",
            ),
            Flag("--cloud-init", "attach a cloud-init seed (default: as the image is marked)", "on|off", ("on", "off")),
            Flag("--description", "one line shown to users by kvmgate templates", "TEXT"),
        ),
        options=True,
        usage="kvmgate admin template add NAME (--image IMAGE | --disk-size SIZE) [SETTING...] -- OPTION...",
        epilog='Writes /etc/kvmgate/templates/NAME.toml (docs/policy.md, "Templates").\nVM options:\n{options}',
    ),
    Verb("admin-template-remove", "remove a template (VMs made from it stay; admin show marks them)"),
    Verb(
        "admin-template-list",
        "list the templates, the grants that name them and the VMs made from each",
        (JSON,),
        target=None,
    ),
    Verb(
        "admin-template-check",
        "check the template and grant files; exit 3 with FILE:LINE: what, for each error",
        (JSON,),
        target=None,
    ),
    Verb(
        "admin-grant",
        "grant a user (or @group) templates and limits, or --revoke it; the most generous matching grant "
        "applies, limit by limit",
        (
            Flag("--templates", "the templates it may make VMs from", "T[,T...]"),
            Flag("--vms", "at most N VMs (default 1)", "N"),
            Flag("--memory", "at most SIZE of guest memory defined, the sum of -m", "SIZE"),
            Flag("--running-memory", "at most SIZE of guest memory running at once", "SIZE"),
            Flag("--disk", "at most SIZE of disk: the sum of virtual sizes, and of real bytes", "SIZE"),
            Flag("--ports", "at most N forwarded host ports", "N"),
            Flag("--revoke", "remove this grant (VMs already made stay)"),
        ),
        target="USER|@GROUP",
        usage="kvmgate admin grant USER|@GROUP --templates T[,T...] [--vms N] [--memory SIZE] "
        "[--running-memory SIZE] [--disk SIZE] [--ports N] | --revoke",
        epilog="A limit left out does not bound that resource (the templates' sizes times --vms still do).\n"
        'Writes /etc/kvmgate/grants.toml (docs/policy.md, "Grants").',
    ),
    Verb("admin-quota", "every user's (or USER's) use and limits", (JSON,), target="USER", target_optional=True),
    Verb("gated-config", "kvmgate-gated's listener table", target=None, internal=True),
    Verb("gated-used", "a connection through kvmgate-gated used the VM now", target="OWNER:NAME", internal=True),
    Verb("gated-wake", "wake a VM for kvmgate-gated", target="OWNER:NAME", internal=True),
    Verb(
        "gated-hold",
        "count kvmgate-gated's open connections as a session of the VM's owner",
        (Flag("--pid", "gated's own pid", "PID"), Flag("--on", "start holding"), Flag("--off", "stop holding")),
        target="OWNER:NAME",
        internal=True,
    ),
    Verb("gated-idle", "freeze an idle VM per its logoff policy", target="OWNER:NAME", internal=True),
    Verb("slurm-job", "the node side of a VM's Slurm job: start it as the job's foreground child", internal=True),
    Verb(
        "admin-move",
        "the Slurm backend: hibernate a running VM and restore it on another node (or NODE)",
        (OWNER_REQUIRED, Flag("--to", "the node to restore it on (default: the one the scheduler picks)", "NODE")),
    ),
    Verb(
        "admin-evacuate",
        "the Slurm backend: move every VM off NODE (drain it first: scontrol update nodename=NODE state=drain)",
        (JSON,),
        target="NODE",
    ),
)

BY_NAME: dict[str, Verb] = {v.name: v for v in VERBS}


class Request(NamedTuple):
    """One parsed helper call. Flags are keyed by their names in the table."""

    verb: str
    name: str | None
    flags: dict[str, str]
    options: tuple[str, ...] = ()

    def flag(self, name: str) -> str | None:
        return self.flags.get(name)

    def has(self, name: str) -> bool:
        return name in self.flags

    @property
    def as_json(self) -> bool:
        return "--json" in self.flags


def unparse(req: Request, drop: tuple[str, ...] = ()) -> list[str]:
    """The words that parse back to `req` (without the flags in `drop`)."""
    verb = BY_NAME[req.verb]
    words = [*verb.words, *([req.name] if req.name is not None else [])]
    words += [req.flags[a] for a in verb.args if a in req.flags]
    for spec in verb.flags:
        if spec.name in req.flags and spec.name not in drop:
            words += [spec.name] if spec.metavar is None else [spec.name, req.flags[spec.name]]
    return words + (["--", *req.options] if req.options else [])


def verb_of(argv: list[str]) -> tuple[Verb, list[str]]:
    """The verb the words name, and the words after it."""
    if not argv:
        raise UsageError("missing verb")
    name, rest = argv[0], argv[1:]
    if name == "admin" and rest:
        if rest[0] in GROUPS and len(rest) > 1:
            name, rest = f"admin-{rest[0]}-{rest[1]}", rest[2:]
        else:
            name, rest = f"admin-{rest[0]}", rest[1:]
    verb = BY_NAME.get(name)
    if verb is None or verb.frontend:
        raise UsageError(f"unknown verb {name[:40]!r}")
    return verb, rest


def parse(argv: list[str]) -> Request:
    """The helper's strict parser: exactly the table's flags, each at most once,
    values as the next word, no abbreviations and no `--flag=value`."""
    verb, rest = verb_of(argv)
    flags: dict[str, str] = {}
    name: str | None = None
    options: tuple[str, ...] = ()
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            if not verb.options:
                raise UsageError(f"{verb.name} takes no VM options")
            options = tuple(rest[i + 1 :])
            break
        spec = verb.flag(tok)
        if spec is not None:
            if tok in flags:
                raise UsageError(f"{tok} given twice")
            if spec.metavar is None:
                flags[tok] = ""
                i += 1
                continue
            if i + 1 >= len(rest):
                raise UsageError(f"{tok} needs a value")
            value = rest[i + 1]
            if spec.choices and value not in spec.choices:
                raise UsageError(f"{tok} takes {', '.join(spec.choices)}")
            flags[tok] = value
            i += 2
            continue
        if tok.startswith("-"):
            hint = f" (QEMU options go after `--`: kvmgate {' '.join(verb.words)} NAME -- {tok[:40]} ...)"
            raise UsageError(f"{verb.name}: unknown flag {tok[:40]!r}" + (hint if verb.options else ""))
        more = [a for a in verb.args if a not in flags]
        if name is not None and more:
            flags[more[0]] = tok
            i += 1
            continue
        if verb.target is None or name is not None:
            raise UsageError(f"{verb.name}: unexpected argument {tok[:40]!r}")
        name = tok
        i += 1
    if verb.target is not None and name is None and not verb.target_optional:
        raise UsageError(f"{verb.name} needs {'a VM name' if verb.target == 'NAME' else verb.target}")
    for spec in verb.flags:
        if spec.required and spec.name not in flags:
            raise UsageError(f"{verb.name} needs {spec.name} {spec.metavar}")
    return Request(verb.name, name, flags, options)
