"""Root-only verbs: host set-up and the VM registry. Imported only for root."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
import subprocess
from collections.abc import Callable
from typing import Any

from kvmgate.errors import FileRefused, KvmgateError, PolicyError, UsageError, WrongState
from kvmgate.host import audit, pam
from kvmgate.host.accounts import ensure_system_user
from kvmgate.host.caller import Caller
from kvmgate.model import identity as ident
from kvmgate.model import qcow2
from kvmgate.model import selfservice as ss
from kvmgate.model.commands import Request
from kvmgate.model.policy.policy import Policy
from kvmgate.model.policy.table import OPTIONS
from kvmgate.model.settings import Settings, check_on_logoff, parse_idle, parse_seconds
from kvmgate.ops import vms
from kvmgate.ops.inspect import describe
from kvmgate.ops.plan import plan_for
from kvmgate.paths import GATED_USER, QEMU_GROUP, SERVICE_USER, Paths
from kvmgate.store import config, define, every, jobs, locks, registry
from kvmgate.store.files import write_atomic
from kvmgate.store.trees import remove_tree
from kvmgate.verbs.common import emit

UDEV_RULE = "/etc/udev/rules.d/65-kvmgate.rules"


def run(req: Request, who: Caller, paths: Paths) -> int:
    verb = req.verb.removeprefix("admin-")
    if verb == "init":
        return init(req, paths)
    if verb == "list":
        rows = []
        for o, n in every.list_names(paths):
            try:
                rows.append(describe(registry.resolve(paths, o, n)))
            except KvmgateError as err:
                rows.append({"name": n, "owner": o, "state": "invalid", "error": str(err)})
        emit(rows, "".join(f"{r['owner']:<16} {r['name']:<32} {r['state']}\n" for r in rows), req.as_json)
        return 0
    if verb in ("net-up", "net-down"):
        from kvmgate.host import network

        policy = config.load(paths)
        define.ensure_layout(paths)
        for line in network.up(paths, policy) if verb == "net-up" else network.down(paths, policy):
            print(f"{verb}: {line}")
        return 0
    if verb == "owner-map":
        from kvmgate.host import ownermap

        policy = config.load(paths)
        info = ownermap.report(paths, policy.net, every.all_settings(paths))
        emit(info, _owner_map_text(info), req.as_json)
        return 0
    owner = req.flag("--owner")
    if verb == "create" and not owner and req.has("--service"):
        ensure_system_user(SERVICE_USER)
        owner = SERVICE_USER
    if not owner:
        raise UsageError(f"admin {verb} needs --owner USER")
    name = ident.check_name(req.name or "")
    ident.check_owner(owner)
    if verb == "create":  # serialised by the allocation lock and the exclusive name link
        return create(req, who, paths, owner, name)
    vm = registry.resolve(paths, owner, name)
    with locks.vm_lock(paths, owner, name, locks.INTERNAL_WAIT):  # root waits as long as an operation may take
        if verb == "delete":
            return delete(req, who, paths, vm)
        if verb == "show":
            return show(req, paths, vm)
        if verb == "set":
            return set_settings(req, who, paths, vm)
        if verb == "resize":
            return resize(req, who, paths, vm)
    raise UsageError(f"unknown admin verb {verb}")


def _owner_map_text(info: dict[str, Any]) -> str:
    out = [f"generation {info['generation']}\n"]
    out += [f"{r['network']:<12} {r['ip']:<16} {r['owner']}/{r['name']}\n" for r in info["rows"]]
    out += [f"{q['network']:<12} {q['ip']:<16} held back until every live server applies {q['generation']}\n"
            for q in info["quarantine"]]  # fmt: skip
    out += [f"{f['network']:<12} every free address held back until every live server applies {f['generation']}\n"
            for f in info["fenced"]]  # fmt: skip
    out += [f"server {s['server']}: {'applied ' + str(s['applied']) if s['live'] else 'not running'}\n"
            for s in info["servers"]]  # fmt: skip
    return "".join(out)


def _owner_map(req: Request, policy: Policy, settings: Settings, nets: list[str] | None) -> Settings:
    """--owner-map: for service VMs with a NIC on a services network only."""
    flag = req.flag("--owner-map")
    on = settings.owner_map if flag is None else flag == "on"
    if on and not settings.service:
        raise PolicyError("--owner-map", "is for service VMs (admin create --service)")
    names = nets if nets is not None else [n.network for n in settings.nics]
    if on and not any(policy.net.network(n).kind == "services" for n in names):
        raise PolicyError("--owner-map", "needs a NIC on a services network (--network services,...)")
    return settings.with_(owner_map=on)


def resize(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    """Grow a stopped VM's disk, never shrink it. The file is the owner's: it is
    opened with the owner's rights, its header checked (no backing file), and a
    qcow2 is grown by qemu-img running as the owner."""
    disk, size = req.flag("DISK"), req.flag("SIZE")
    if not disk or not size:
        raise UsageError("admin resize needs NAME DISK SIZE")
    if "/" in disk or disk.startswith("."):
        raise UsageError("DISK is a file name in the VM's disks/ directory, e.g. disk0.qcow2")
    if jobs.running(vm) or registry.read_saved(vm) is not None:
        raise WrongState(f"{vm.identity.name} is running or hibernated: stop it (or discard its state) first")
    new = ss.parse_size(size)
    limit = config.load(paths).limits.image_max_gib << 30
    if new > limit:
        raise PolicyError("SIZE", f"{size} is above this host's image limit")
    from kvmgate.host import launch

    pw = pwd.getpwnam(vm.identity.owner)
    path = vm.sub("disks", disk)
    fd = launch.open_as(pw, path, True, "DISK")
    settings = registry.read_settings(vm)
    # The overlay of a library image names it in its header: compared, never followed.
    backing = None
    if settings.image_id and disk == registry.DEFAULT_DISK:
        from kvmgate.model.images import backing_name

        backing = backing_name(settings.image_id)
    try:
        head = os.pread(fd, qcow2.HEADER_READ, 0)
        if disk.endswith(".qcow2"):
            current = qcow2.inspect(head, backing).virtual_size
        elif head.startswith(qcow2.MAGIC):
            raise FileRefused(f"{disk}: a qcow2 image whose name says raw")
        else:
            current = os.fstat(fd).st_size
        if new <= current:
            raise PolicyError("SIZE", f"{disk} is already {current >> 20} MiB: a disk only grows")
        if disk.endswith(".qcow2"):
            spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
            argv = ["qemu-img", "resize", "-q", "json:" + json.dumps(spec), str(new)]
            subprocess.run(argv, check=True, capture_output=True, timeout=600, pass_fds=(fd,),
                           user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"})  # fmt: skip
        else:
            os.ftruncate(fd, new)
    finally:
        os.close(fd)
    audit.done(paths.audit_log, who, "admin resize", vm.identity.owner, vm.identity.name, disk=disk, size=new)
    print(f"{vm.identity.owner}/{vm.identity.name}: {disk} is now {new >> 20} MiB")
    return 0


def delete(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    d = vms.delete(paths, who, vm, req.has("--keep-disks"), req.has("--force"), "admin delete")
    print(d.said(f"{vm.identity.owner}/{vm.identity.name}"))
    return 0


def _new_options(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> registry.VM:
    """`admin set NAME -- OPTION...`: the options are the identity, so the VM gets a new one."""
    if jobs.running(vm) or registry.read_saved(vm) is not None:
        raise WrongState(f"{vm.identity.name} is running or hibernated: stop it (or discard its state) first")
    opts = config.load(paths).parse(list(req.options), "admin")
    if registry.read_settings(vm).nics and any(o.name == "-net" for o in opts):
        raise PolicyError("-net", "this VM has the admin's named networks: use those, not -net options")
    identity = ident.Identity(vm.identity.owner, vm.identity.name, tuple(t for o in opts for t in o.tokens()))
    new = define.reidentify(paths, vm, identity)
    remove_tree(vm.rundir)  # the old identity's runtime directory (nothing runs)
    audit.done(paths.audit_log, who, "admin set options", vm.identity.owner, vm.identity.name,
               options=list(identity.tokens), directory=new.vmdir)  # fmt: skip
    print(f"{vm.identity.owner}/{vm.identity.name}: new options; {new.vmdir}")
    return new


SETTINGS_FLAGS = (
    "--on-logoff", "--logoff-delay", "--on-pressure", "--idle", "--wake", "--forward", "--network", "--guest-agent",
    "--owner-map",
)  # fmt: skip


def set_settings(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    settings = registry.read_settings(vm)
    mode, idle, delay = req.flag("--on-logoff"), req.flag("--idle"), req.flag("--logoff-delay")
    if all(req.flag(f) is None for f in SETTINGS_FLAGS) and not req.options:
        raise UsageError("admin set needs one of " + ", ".join(SETTINGS_FLAGS) + ", or -- OPTION...")
    if req.options:
        vm = _new_options(req, who, paths, vm)
        settings = registry.read_settings(vm)
    if jobs.running(vm) and any(req.flag(f) is not None for f in ("--network", "--forward", "--wake")):
        # Its taps, guarded ports and addresses are in use: changing them under it would
        # drop its anti-spoofing rules and hand its address to another VM.
        raise WrongState(f"{vm.identity.name} is running: stop it to change its networks or ports")
    agent = req.flag("--guest-agent")
    if agent is not None:
        if jobs.running(vm) or registry.read_saved(vm) is not None:  # a device: a saved state needs it as it was
            raise WrongState(f"{vm.identity.name} is running or hibernated: stop it to change its guest agent channel")
        settings = settings.with_(guest_agent=agent == "on")
    if req.flag("--owner-map") is not None or req.flag("--network") is not None:
        if req.flag("--owner-map") is not None and (jobs.running(vm) or registry.read_saved(vm) is not None):
            raise WrongState(f"{vm.identity.name} is running or hibernated: stop it to change its owner map disks")
        settings = _owner_map(req, config.load(paths), settings, _net(req).networks)
    if mode is not None:
        settings = settings.with_(on_logoff=check_on_logoff(mode))
    if req.flag("--on-pressure") is not None:
        settings = settings.with_(on_pressure=req.flag("--on-pressure"))
    if idle is not None:
        settings = settings.with_(idle=parse_idle(idle))
    if delay is not None:
        settings = settings.with_(logoff_delay=parse_seconds(delay, "--logoff-delay", "at once"))
    settings = _allocate(req, paths, vm, settings, lambda s: define.write_settings(vm, s))
    shown = json.loads(settings.to_json())
    audit.done(paths.audit_log, who, "admin set", vm.identity.owner, vm.identity.name, settings=shown)
    print(f"{vm.identity.owner}/{vm.identity.name}: " + json.dumps(shown, sort_keys=True))
    return 0


def _allocate(
    req: Request, paths: Paths, vm: registry.VM, settings: Settings, commit: Callable[[Settings], object]
) -> Settings:
    wake = req.flag("--wake")
    if wake not in (None, "on", "off"):
        raise UsageError("--wake takes on or off")
    return vms.allocate(paths, vm, settings, _net(req), commit)


def _net(req: Request) -> vms.Network:
    nets, wake = req.flag("--network"), req.flag("--wake")
    return vms.Network(nets.split(",") if nets is not None else None, req.flag("--forward"),
                       None if wake is None else wake == "on")  # fmt: skip


def create(req: Request, who: Caller, paths: Paths, owner: str, name: str) -> int:
    vms.owner_pw(owner)
    policy = config.load(paths)
    opts = policy.parse(req.options, "admin")
    identity = ident.Identity(owner, name, tuple(t for o in opts for t in o.tokens()))
    if req.flag("--network") is not None and any(o.name == "-net" for o in opts):
        raise PolicyError("--network", "use either the admin's named networks or -net options, not both")
    if req.flag("--wake") not in (None, "on", "off"):
        raise UsageError("--wake takes on or off")
    service = req.has("--service")
    settings = Settings(
        on_logoff=check_on_logoff(req.flag("--on-logoff") or "none"),
        service=service,
        autostart=service and not req.has("--no-autostart"),
        guest_agent=req.flag("--guest-agent") == "on",
        on_pressure=req.flag("--on-pressure") or "refuse",
    )
    settings = _owner_map(req, policy, settings, _net(req).networks)
    if req.flag("--logoff-delay") is not None:
        settings = settings.with_(
            logoff_delay=parse_seconds(req.flag("--logoff-delay") or "", "--logoff-delay", "at once")
        )
    size = req.flag("--disk-size")
    image_name = req.flag("--image")
    seed = req.flag("--cloud-init")
    if seed is None and image_name is not None:
        from kvmgate.store import images

        settings = settings.with_(cloud_init=images.read(paths, image_name).cloud_init)
    else:
        settings = settings.with_(cloud_init=seed == "on")
    vm = vms.create(paths, who, identity, settings, _net(req), image_name, ss.parse_size(size) if size else None)
    print(f"created {owner}/{name}: {vm.vmdir}")
    return 0


def show(req: Request, paths: Paths, vm: registry.VM) -> int:
    policy = config.load(paths)
    info: dict[str, Any] = describe(vm)
    info["options"] = list(vm.identity.tokens)
    info.update(json.loads(registry.read_settings(vm).to_json()))
    info["identity_components"] = vm.identity.components()
    made_from = registry.read_settings(vm).template
    if made_from is not None:  # a user made it from a template: has the template changed since?
        from kvmgate.store import selfservice

        now = selfservice.load(paths, policy).templates.get(made_from)
        info["template_drift"] = (
            "removed: the template no longer exists"
            if now is None
            else "none"
            if now.digest() == info["template_digest"]
            else "changed: the template was edited since this VM was made; the VM keeps what it was made with"
        )
    disk = vm.default_disk
    info["default_disk"] = disk if os.path.lexists(disk) else None
    try:
        info["qemu_argv"] = [policy.qemu, *plan_for(vm, policy, [], config.accel(policy)).argv]
    except PolicyError as err:
        info["qemu_argv"] = None
        info["error"] = str(err)
    from kvmgate.host import qemu_version

    try:
        info["qemu_version"] = qemu_version.text(qemu_version.version(paths, policy.qemu))
    except KvmgateError as err:
        info["qemu_version"] = None
        info["qemu_error"] = str(err)

    def show_value(v: Any) -> str:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return " ".join(v)
        return v if isinstance(v, str) else json.dumps(v)

    text = "".join(f"{k}: {show_value(v)}\n" for k, v in info.items())
    emit(info, text, req.as_json)
    return 0


# ------------------------------------------------------------------------------ init


def default_policy(accel: str) -> str:
    lines = [
        "# kvmgate policy. Owned by root; kvmgate refuses it if anyone else can write it.",
        "# The design note's three lists are the defaults. Move options between lists here;",
        "# options that hand out host resources can never be moved to the users' list.",
        f'accel = "{accel}"          # auto (kvm if usable, else tcg) | kvm | tcg',
        'qemu = "/usr/bin/qemu-system-x86_64"',
        "stop_timeout = 30          # seconds of ACPI power-down before a kill",
        "memory_overhead_mib = 256  # cgroup memory limit = -m + this",
        "running_memory_budget_mib = 0  # guest RAM running at once on this host (0: no budget; docs/policy.md)",
        "",
        "[lists]",
        '# user = ["-smp"]',
        "# admin = []",
        "# unused = []",
        "",
        "[ports]",
        "pool = [20000, 20999]      # host ports for admin create --forward",
        'bind = "127.0.0.1"         # forwarded ports listen here; "0.0.0.0" makes them public',
        "protect = true             # nftables: on this host only the VM's owner (and root) may connect",
        "internal = [40000, 40999]  # loopback ports between kvmgate-gated and QEMU",
        "",
        "[vnc]",
        'mode = "unix"              # unix: a socket only the owner can open; tcp: loopback port + password',
        "",
        "[host]",
        'ifprefix = "kg"            # taps are kgt<n>, private bridges kgp<uid>, nftables tables kvmgate_kg',
        "",
        "# Named networks (admin create --network NAME). user is QEMU's NAT and always exists.",
        "[networks.user]",
        'type = "user"',
        "[networks.private]         # one bridge per owner: an owner's VMs see each other",
        'type = "private"',
        "[networks.services]        # user VMs on isolated ports reach service VMs, never each other",
        'type = "services"',
        'bridge = "kgsvc0"',
        'subnet = "10.77.0.0/24"     # host .1 (DHCP only), VMs .2 and up, one fixed address per MAC',
        "",
        "[limits]",
        "mem_min_mib = 16",
        "mem_max_mib = 16384",
        "smp_max = 4",
        "vnc = [1, 99]",
        'machines = ["pc", "q35"]',
        "",
        "# Default lists:",
    ]
    for lname in ("user", "admin", "unused"):
        names = [n for n, o in OPTIONS.items() if o.default == lname]
        lines.append(f"#   {lname}: " + " ".join(names))
    return "\n".join(lines) + "\n"


def _say(msg: str) -> None:
    print(f"init: {msg}")


def init(req: Request, paths: Paths) -> int:
    accel = req.flag("--accel")
    if accel is not None and accel not in ("auto", "kvm", "tcg"):
        raise UsageError("--accel must be auto, kvm or tcg")
    define.ensure_layout(paths)
    os.makedirs(paths.etc, 0o755, exist_ok=True)
    os.chmod(paths.etc, 0o755)
    if not os.path.exists(paths.policy):
        write_atomic(paths.policy, default_policy(accel or "auto"), 0o644)
        _say(f"wrote the default policy {paths.policy}")
    elif accel is not None:
        with open(paths.policy) as f:
            text = f.read()
        text, n = re.subn(r"(?m)^accel\s*=.*$", f'accel = "{accel}"', text)
        if not n:
            text = f'accel = "{accel}"\n' + text
        write_atomic(paths.policy, text, 0o644)
        _say(f"set accel = {accel} in {paths.policy}")
    if req.flag("--backend") is not None or req.flag("--partition") is not None:
        _backend(paths, req.flag("--backend"), req.flag("--partition"))
    config.load(paths)  # refuse to finish with a policy kvmgate would refuse
    try:
        gid = grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", QEMU_GROUP], check=True)
        gid = grp.getgrnam(QEMU_GROUP).gr_gid
        _say(f"created group {QEMU_GROUP} (QEMU's primary group; no user is ever a member)")
    if ensure_system_user(GATED_USER):
        _say(f"created the system account {GATED_USER} (the unprivileged wake-on-connect daemon)")
    members = grp.getgrgid(gid).gr_mem
    if members:
        _say(f"WARNING: {QEMU_GROUP} has members {members}: they could ptrace VMs; remove them")
    _device("/dev/kvm", gid, 0o660, f"root:{QEMU_GROUP} 0660: only kvmgate's QEMU processes can open it")
    _device("/dev/net/tun", 0, 0o600, "root:root 0600: only the root helper opens taps")
    rule = (
        f'KERNEL=="kvm", GROUP="{QEMU_GROUP}", MODE="0660"\n'
        'KERNEL=="tun", GROUP="root", MODE="0600", OPTIONS+="static_node=net/tun"\n'
    )
    if os.path.isdir(os.path.dirname(UDEV_RULE)):
        write_atomic(UDEV_RULE, rule, 0o644)
    try:
        kvm_members = grp.getgrnam("kvm").gr_mem
    except KeyError:
        kvm_members = []
    if kvm_members:
        _say(f"note: users in group kvm ({', '.join(kvm_members)}) no longer reach /dev/kvm through it")
    _install_sudoers(paths)
    from kvmgate.host import network

    for line in network.up(paths, config.load(paths)):
        _say(f"network: {line}")
    if req.has("--cockpit"):
        from kvmgate.host import cockpit

        _say(cockpit.install_packages())
        for line in cockpit.vendor(paths.cockpit, fetch=True):
            _say(f"cockpit page: {line}")
        _say(cockpit.enable_socket())
        _say(f"the page: /cockpit/@localhost/{os.path.basename(paths.cockpit)}/index.html (docs/cockpit.md)")
    if req.has("--pam"):
        # A browser session counts as a logon only if the admin lists cockpit in logon_services.
        web = "cockpit" in config.load(paths).logon_services and os.path.exists("/etc/pam.d/cockpit")
        services = pam.SERVICES + (("cockpit",) if web else ())
        _say(pam.install_pam(paths, services=services))
        unlisted = pam.unlist(paths, services)
        if unlisted:
            _say(unlisted)
        from kvmgate.host import logind

        if logind.running():
            _say("note: logind runs here, so kvmgate-sessions.service (admin sessions --watch) takes logons from it; "
                 "the PAM hook is not needed (a logon counted twice is still one logon)")  # fmt: skip
    elif req.has("--no-pam"):
        _say(pam.uninstall_pam(paths))
    from kvmgate.host import schedule

    if req.has("--cron"):
        _say(schedule.install_cron(paths))
    elif req.has("--no-cron"):
        _say(schedule.remove_cron(paths))
    missing = schedule.without_systemd(paths)
    if missing:
        _say(missing)
    if not _proc_hides_pids():
        _say(
            "note: /proc is mounted without hidepid: users see each other's processes (not VMs' kernel command "
            'lines or files, which kvmgate keeps off them; docs/security.md, "Hidden command lines")'
        )
    _say("done")
    return 0


def _backend(paths: Paths, kind: str | None, partition: str | None) -> None:
    """Rewrite the policy's [backend] table, keeping what the admin set there. A
    switch while any VM runs or is hibernated is refused: its state and its job
    belong to the backend that made them."""
    from kvmgate.model.slurm import Backend, backend_table, parse_backend
    from kvmgate.store import every, jobs

    current = config.load(paths).backend
    kind = kind or current.kind
    if kind == "local" and partition is not None:
        raise UsageError("--partition is for --backend slurm")
    wanted = Backend(kind, partition or current.partition, *current[2:])
    if partition is not None:
        parse_backend({"kind": kind, "partition": partition})  # a plain Slurm name, or a one-line refusal
    if kind == "slurm" and wanted.partition is None:
        raise UsageError("--backend slurm needs --partition NAME (the partition VMs' jobs go to)")
    if kind == "slurm":
        from kvmgate.host import slurm as hslurm

        if not os.access(f"{hslurm.BIN}/sbatch", os.X_OK):
            raise WrongState("Slurm's client is not installed here (sbatch, srun, scontrol): install slurm-client")
        for part in {p for p in (wanted.partition, wanted.service_partition) if p is not None}:
            if not hslurm.known(wanted, "partition", part):
                raise UsageError(f"--partition: Slurm knows no partition {part!r} (docs/cluster.md)")
    if kind != current.kind:
        for vm in every.each_vm(paths):
            if jobs.running(vm) or registry.read_saved(vm) is not None or jobs.read_or_damaged(vm) is not None:
                raise WrongState(f"{vm.identity.owner}'s VM {vm.identity.name} runs or is hibernated: stop it "
                                 f"(or discard its saved state) before switching the backend")  # fmt: skip
    with open(paths.policy) as f:
        previous = f.read()
    text = re.sub(r"(?ms)^\[backend\][^\n]*\n.*?(?=^\[|\Z)", "", previous).rstrip("\n")
    write_atomic(paths.policy, text + "\n\n" + backend_table(wanted), 0o644)
    try:
        config.load(paths)
    except KvmgateError:
        write_atomic(paths.policy, previous, 0o644)
        raise
    shared = os.path.join(paths.state, "sessions")  # logons counted across login nodes (store.sessions)
    if kind == "slurm":
        os.makedirs(shared, 0o700, exist_ok=True)
    elif os.path.isdir(shared):
        remove_tree(shared)
    _say(f"backend = {kind}" + (f", partition {wanted.partition} (docs/cluster.md)" if kind == "slurm" else ""))


def _proc_hides_pids() -> bool:
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    opts = [o for m in mounts if len(m) > 3 and m[1] == "/proc" for o in m[3].split(",")]
    return any(o.startswith("hidepid=") and o not in ("hidepid=0", "hidepid=off") for o in opts)


def sudoers_text(paths: Paths) -> str:
    # The alias is named after the drop-in, so two installations (say, a test one)
    # never define the same alias: a duplicate alias breaks sudo for everyone.
    alias = re.sub(r"[^A-Z0-9]", "_", os.path.basename(paths.sudoers).upper())
    alias = alias if alias.startswith("KVMGATE") else "KVMGATE_" + alias
    return (
        "# Installed by `kvmgate admin init`: every user may run kvmgate's privileged helper\n"
        "# as root, and nothing else through this file. The helper takes the caller from\n"
        "# SUDO_UID, re-validates every argument and refuses anything outside the policy.\n"
        f"Cmnd_Alias {alias} = {paths.helper}\n"
        f"Defaults!{alias} env_reset, !setenv, closefrom=3, !use_pty, !pam_session\n"
        f"ALL ALL=(root) NOPASSWD: {alias}\n"
    )


def _install_sudoers(paths: Paths) -> None:
    """Install the drop-in only if visudo accepts it alone and then the whole
    configuration with it; otherwise put back what was there. A broken sudoers
    file would lock every admin out of sudo."""
    folder = os.path.dirname(paths.sudoers)
    if not os.path.isdir(folder):
        _say(f"{folder} does not exist: is sudo installed? (users cannot use kvmgate)")
        return
    try:
        with open(paths.sudoers) as f:
            previous: str | None = f.read()
    except FileNotFoundError:
        previous = None
    text = sudoers_text(paths)
    if previous != text:
        check = f"{folder}/.kvmgate.{os.getpid()}"  # visudo -cf checks the drop-in alone first
        write_atomic(check, text, 0o440)
        _visudo("-cf", check)
        write_atomic(paths.sudoers, text, 0o440)
        try:
            _visudo("-c")
        except KvmgateError:
            if previous is None:
                os.unlink(paths.sudoers)
            else:
                write_atomic(paths.sudoers, previous, 0o440)
            raise
    _say(f"{paths.sudoers} lets users run {paths.helper} as root, and nothing else (checked with visudo)")


def _visudo(*args: str) -> None:
    check = subprocess.run(["visudo", *args], capture_output=True, text=True)
    if args[0] == "-cf":
        os.unlink(args[1])
    if check.returncode != 0:
        raise KvmgateError(f"visudo refused the sudoers configuration: {(check.stdout + check.stderr).strip()}")


def _device(path: str, gid: int, mode: int, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _say(f"{path} does not exist (skipped)")
        return
    if st.st_gid != gid or stat.S_IMODE(st.st_mode) != mode or st.st_uid != 0:
        os.chown(path, 0, gid)
        os.chmod(path, mode)
    _say(f"{path} is {what}")
