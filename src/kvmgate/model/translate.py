"""Translate the note's vocabulary into the argv of today's QEMU. Pure.

Rules this module guarantees (and the property tests check):
- The argv is built only from constants, validated typed values, and fd numbers
  it allocates itself. User paths never appear in it: every file becomes a file
  descriptor the launcher opens with the owner's rights (`/dev/fdset/N` for
  disks, `/proc/self/fd/N` for sealed copies of kernels and ROMs).
- Block devices are described as JSON (`-blockdev {...}`), so no value is ever
  read by QEMU's comma/`key=` syntax, and images get an explicit format with
  `"backing": null`: no format probing, no backing files.
- `-nodefaults -no-user-config`, no HMP monitor, QMP only on the fd kvmgate owns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

from kvmgate.errors import PolicyError
from kvmgate.model.digest import sha256
from kvmgate.model.policy import grammar as g
from kvmgate.model.policy.policy import ParsedOption
from kvmgate.model.settings import Forward, Nic

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# -smb makes QEMU fork and exec smbd on the guest's first connection, which spawn=deny
# would punish with SIGSYS: only VMs whose admin chose -smb get spawning back.
SANDBOX_SMB = "on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny"
DEFAULT_MEM_MIB = 128  # the design note's default
TCG_CACHE_MIB = 128  # TCG's translation cache, in the VM's memory cgroup

Accel = Literal["kvm", "tcg"]
ResourceKind = Literal[
    "qmp",
    "console",
    "console-log",
    "lock",
    "disk",
    "base",
    "overlay",
    "blob",
    "tap",
    "config",
    "seed",
    "agent",
    "ownermap",
    "ownerack",
]


class Resource(NamedTuple):
    """Something the launcher opens before exec, installed in QEMU as `fd`."""

    kind: ResourceKind
    fd: int
    path: str | None = None
    writable: bool = False
    fmt: str | None = None  # disks: "raw" or "qcow2"
    of: str | None = None  # disks and overlays: the drive node ("hda", ...)
    bridge: str | None = None  # taps: the bridge the helper attaches them to
    isolated: bool = False  # taps: an isolated bridge port (user VMs on a services network)
    text: str | None = None  # config: what QEMU reads through -readconfig /proc/self/fd/N
    backing: str | None = None  # disks: the backing name the header must carry (a library overlay)


class Port(NamedTuple):
    """Where one of the VM's settings' NICs plugs in: the bridge the helper puts its
    tap on (None: QEMU's user network), and whether that bridge port is isolated
    (user VMs on a services network)."""

    nic: Nic
    bridge: str | None = None
    isolated: bool = False


class Vnc(NamedTuple):
    """The display this start gets: a unix socket in the owner's directory, or
    loopback TCP at 5900 + display with a password set over QMP after start."""

    mode: Literal["unix", "tcp"]
    display: int = 0
    socket: str | None = None

    @property
    def port(self) -> int:
        return 5900 + self.display


class BaseImage(NamedTuple):
    """The library image under the VM's default disk: opened read-only by root,
    given to QEMU as the overlay's backing node. The overlay's header must name
    `backing`, and QEMU never follows that name."""

    path: str
    backing: str


def base_image(library: str, image_id: str) -> BaseImage:
    """The library image `image_id` (its data file in the library directory)."""
    from kvmgate.model.images import backing_name

    return BaseImage(f"{library}/{image_id}.qcow2", backing_name(image_id))


_MACHINE_FAMILY = {"pc": "pc-i440fx", "q35": "pc-q35"}
MACHINE_VERSION = r"[0-9]{1,2}\.[0-9]{1,2}"
VERSIONED_MACHINE = re.compile(rf"(pc-i440fx|pc-q35)-{MACHINE_VERSION}", re.ASCII)


def _versioned_machine(recorded: str, family: str) -> str:
    """The machine type a saved state was made with (`pc-i440fx-7.2`): a newer QEMU
    keeps the old types so that it can load old states, while its `pc` alias moves
    on. Only a versioned type of the VM's own family is taken; a bare version
    (`7.2`, a record from before machine types were recorded) means that
    version of the VM's family."""
    if re.fullmatch(MACHINE_VERSION, recorded, re.ASCII) and family in _MACHINE_FAMILY:
        recorded = f"{_MACHINE_FAMILY[family]}-{recorded}"
    m = VERSIONED_MACHINE.fullmatch(recorded)
    if m is None or m.group(1) != _MACHINE_FAMILY.get(family):
        raise PolicyError("-M", f"the saved state's machine type {recorded[:40]!r} is not a {family} type")
    return recorded


class Seed(NamedTuple):
    """What the cloud-init seed says about the VM (`model.cloudinit` builds it)."""

    hostname: str  # the VM's name
    instance_id: str  # stable per VM identity
    user: str  # the owner


class Context(NamedTuple):
    """Facts from the host the translation needs, gathered by the caller."""

    accel: Accel
    default_disk: str | None = None  # the VM's own disk, used as -hda if none is given
    vnc_socket: str | None = None  # -vnc as a unix socket at this path; None: loopback TCP with a password
    key: str = ""  # the VM key: seeds deterministic MAC addresses
    paused: bool = False  # start with the vCPUs stopped (kvmgate's own -S)
    incoming: bool = False  # wait for a saved state on a descriptor kvmgate passes later (restore)
    forwards: tuple[Forward, ...] = ()  # --forward ports, on the first user-mode network
    forward_bind: str = "127.0.0.1"  # the policy's address for forwarded ports
    nics: tuple[Port, ...] = ()  # --network NICs; empty: the note's -net options (or its default)
    base_image: BaseImage | None = None  # the default disk is an overlay of this library image
    seed: Seed | None = None  # attach a cloud-init seed (a CD the launcher builds) at every start
    agent: bool = False  # a guest agent channel the helper alone talks to (host.agent)
    data_dirs: tuple[str, ...] = ()  # the policy's qemu_data: -L, for a QEMU installed beside the system's
    machine: str | None = None  # a restore: the versioned machine type the state was saved with
    stop_on_write_error: bool = False  # writable disks: werror=stop (a disk quota's bound pauses the VM)
    cpu: str | None = None  # the policy's [backend] cpu_model: one CPU model on every node of a cluster
    owner_map: tuple[str, tuple[str, ...]] | None = None  # (RUN/<key>, services networks): the owner map's disks


class Plan(NamedTuple):
    """Everything the launcher needs, typed: IO code never reads `argv` back."""

    argv: tuple[str, ...]
    resources: tuple[Resource, ...]
    memory_mib: int
    pidfiles: tuple[str, ...] = ()
    dirs: tuple[tuple[str, str], ...] = ()  # (-tftp|-smb, directory) QEMU reads as the owner: checked first
    vnc: Vnc | None = None
    snapshot: bool = False  # writes go to a throw-away overlay: the VM cannot be hibernated
    host_ports: bool = False  # QEMU listens on host TCP ports (forwards, -redir) the host's rules guard
    restore: bool = False  # a restore continues the run (its console log); a start begins a new one
    tcg: bool = False  # TCG, not KVM: its translation cache counts too

    @property
    def memory_limit_mib(self) -> int:
        """What QEMU may use beyond its own overhead: the guest's RAM, and TCG's cache."""
        return self.memory_mib + (TCG_CACHE_MIB if self.tcg else 0)

    def fds(self) -> list[int]:
        return [r.fd for r in self.resources]


def merge(admin: Sequence[ParsedOption], user: Sequence[ParsedOption]) -> list[ParsedOption]:
    """Admin values always win: a user option the admin already set is refused."""
    fixed = {o.name for o in admin}
    for o in user:
        if o.name in fixed:
            raise PolicyError(o.name, "fixed by the administrator for this VM")
    return [*admin, *user]


def _json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def keyval_escape(text: str) -> str:
    """QEMU's option syntax escapes a literal comma by doubling it (as libvirt does)."""
    return text.replace(",", ",,")


def mac_for(key: str, index: int, attempt: int | None = None) -> str:
    """The one MAC scheme: a locally administered unicast MAC in QEMU's 52:54:00
    block, derived from the VM key, so it is stable across re-creation. The note's
    `-net nic` is seeded `key/index`; named networks' NICs `key/index/attempt`,
    probing further on a clash (both seeds as they always were)."""
    seed = f"{key}/{index}" if attempt is None else f"{key}/{index}/{attempt}"
    h = sha256(seed.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


_DISK_SLOTS = {
    "-hda": ("ide-hd", "ide.0", 0),
    "-hdb": ("ide-hd", "ide.0", 1),
    "-hdc": ("ide-hd", "ide.1", 0),
    "-hdd": ("ide-hd", "ide.1", 1),
    "-cdrom": ("ide-cd", "ide.1", 0),
    "-fda": ("floppy", None, 0),
    "-fdb": ("floppy", None, 1),
}


def disk_format(path: str) -> str:
    """The format comes from the name, never from the content: a raw image whose
    first sector looks like qcow2 stays raw (no format probing)."""
    return "qcow2" if path.endswith(".qcow2") else "raw"


class _Builder:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.argv: list[str] = []
        self.resources: list[Resource] = []
        self.next_fd = 3
        self.macs: list[str] = []  # the guest's NICs, for the cloud-init seed's network-config

    def resource(self, kind: ResourceKind, **kw: object) -> Resource:
        r = Resource(kind, self.next_fd, **kw)  # type: ignore[arg-type]
        self.next_fd += 1
        self.resources.append(r)
        return r

    def add(self, *args: str) -> None:
        self.argv.extend(args)


def translate(options: Sequence[ParsedOption], ctx: Context) -> Plan:
    by: dict[str, list[g.Value]] = {}
    for o in options:
        by.setdefault(o.name, []).append(o.value)

    def one(name: str) -> g.Value | None:
        v = by.get(name)
        return v[0] if v else None

    b = _Builder(ctx)
    snapshot = "-snapshot" in by
    serial = one("-serial")
    serial_mode = serial.canonical if serial else "console"

    # Fixed resources first, so their fd numbers never move.
    qmp = b.resource("qmp")
    b.resource("lock")
    con = log = None
    if serial_mode == "console":
        con = b.resource("console")
        log = b.resource("console-log")

    accel = "tcg" if "-no-kvm" in by else ctx.accel
    machine = one("-M")
    family = machine.canonical if machine else "pc"
    mprops = [_versioned_machine(ctx.machine, family) if ctx.machine else family]
    if "-no-acpi" in by:
        mprops.append("acpi=off")
    mem = one("-m")
    memory = mem.number if isinstance(mem, g.IntValue) else DEFAULT_MEM_MIB

    b.add("-nodefaults", "-no-user-config", *(t for d in ctx.data_dirs for t in ("-L", d)))
    b.add("-machine", ",".join(mprops))
    # TCG's translation cache would otherwise grow to 1 GiB, past the VM's memory
    # cgroup (QEMU then thrashes on its own pages and the guest stalls): bounded, and
    # counted in the cgroup's limit (Plan.memory_limit_mib).
    b.add("-accel", f"tcg,tb-size={TCG_CACHE_MIB}" if accel == "tcg" else accel, "-m", str(memory), "-display", "none")
    if ctx.cpu:
        b.add("-cpu", ctx.cpu)
    b.add("-sandbox", SANDBOX_SMB if "-smb" in by else SANDBOX, "-msg", "timestamp=on")
    if ctx.paused or ctx.incoming:
        b.add("-S")
    if ctx.incoming:
        b.add("-incoming", "defer")
    b.add("-chardev", f"socket,id=kgqmp,fd={qmp.fd},server=on,wait=off", "-mon", "chardev=kgqmp,mode=control")
    if con and log:
        b.add("-add-fd", f"fd={log.fd},set={log.fd},opaque=console-log")
        b.add("-chardev", f"socket,id=kgcon,fd={con.fd},server=on,wait=off,logfile=/dev/fdset/{log.fd},logappend=on")
        b.add("-serial", "chardev:kgcon")
    elif serial_mode == "null":
        b.add("-serial", "null")

    smp = one("-smp")
    if smp:
        b.add("-smp", smp.canonical)
    # -std-vga asks for what is today's default card; -nographic removes the card.
    b.add("-vga", "none" if "-nographic" in by else "std")

    # ---- disks
    if "-hdc" in by and "-cdrom" in by:
        raise PolicyError("-cdrom", "conflicts with -hdc (both are ide1 master)")
    disks: list[tuple[str, str]] = [(n, v.canonical) for n in _DISK_SLOTS for v in by.get(n, [])]
    if "-hda" not in by and ctx.default_disk:
        disks.insert(0, ("-hda", ctx.default_disk))
    geometry = one("-hdachs")
    if geometry and not any(n == "-hda" for n, _ in disks):
        raise PolicyError("-hdachs", "needs hard disk 0 (-hda)")
    if any(n in ("-fda", "-fdb") for n, _ in disks) and (machine and machine.canonical == "q35"):
        b.add("-device", _json({"driver": "isa-fdc", "id": "kgfdc"}))
    for opt, path in disks:
        base = ctx.base_image if (opt, path) == ("-hda", ctx.default_disk) else None
        _disk(b, opt, path, snapshot, geometry if opt == "-hda" else None, base, ctx.stop_on_write_error)

    boot = one("-boot")
    if boot:
        b.add("-boot", f"order={boot.canonical}")
    for opt in ("-kernel", "-initrd"):
        v = one(opt)
        if v:
            r = b.resource("blob", path=v.canonical, of=opt.lstrip("-"))
            b.add(opt, f"/proc/self/fd/{r.fd}")
    append = one("-append")
    if append:
        _append(b, append.canonical)
    for v in by.get("-option-rom", []):
        r = b.resource("blob", path=v.canonical, of="option-rom")
        b.add("-option-rom", f"/proc/self/fd/{r.fd}")
    loadvm = one("-loadvm")
    if loadvm:
        b.add("-loadvm", loadvm.canonical)

    # ---- clock, reboot, misc machine
    if "-localtime" in by:
        b.add("-rtc", "base=localtime")
    if "-no-reboot" in by:
        b.add("-no-reboot")
    if "-win2k-hack" in by:
        b.add("-win2k-hack")
    if "-no-fd-bootchk" in by:
        b.add("-no-fd-bootchk")
    k = one("-k")
    if k:
        b.add("-k", k.canonical)
    if "-usb" in by or "-usbdevice" in by:
        b.add("-usb")
    for v in by.get("-usbdevice", []):
        b.add("-device", {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}[v.canonical])
    balloon = one("-balloon")
    if balloon and balloon.canonical == "virtio":
        b.add("-device", "virtio-balloon-pci")
    par = one("-parallel")
    if par:
        b.add("-parallel", par.canonical)
    mon = one("-monitor")
    if mon:
        b.add("-monitor", "none")
    channels = by.get("-vmchannel", [])
    if channels:
        b.add("-device", "virtio-serial-pci,id=kgvser")
    for i, ch in enumerate(channels):
        assert isinstance(ch, g.Channel)
        b.add("-chardev", f"null,id=kgch{i}")
        b.add("-device", _json({"driver": "virtserialport", "bus": "kgvser.0", "chardev": f"kgch{i}", "name": ch.name}))
    sound = one("-soundhw")
    if isinstance(sound, g.Words):
        b.add("-audiodev", "none,id=kgsnd")
        for card in sound.words:
            if card == "hda":
                b.add("-device", "intel-hda", "-device", "hda-duplex,audiodev=kgsnd")
            else:
                b.add("-device", f"{g.SOUND_CARDS[card]},audiodev=kgsnd")
    d = one("-d")
    if d:
        b.add("-d", d.canonical)
    bios = one("-L")
    if bios:
        b.add("-L", bios.canonical)
    vnc_opt = one("-vnc")
    vnc = None
    if vnc_opt and "-nographic" in by:
        raise PolicyError("-vnc", "this VM has no graphics card (-nographic): there is no screen to show")
    # A graphics card always gets its owner-only socket, -vnc or not: a screen
    # nobody can ever see is no use (`kvmgate vnc` shows how to reach it).
    if vnc_opt or (ctx.vnc_socket and "-nographic" not in by):
        # Never a public listener: a unix socket in a directory only the owner can
        # enter, or loopback TCP with a password kvmgate sets at every start.
        if ctx.vnc_socket:
            vnc = Vnc("unix", socket=ctx.vnc_socket)
            b.add("-vnc", f"unix:{ctx.vnc_socket}")
        elif vnc_opt:
            vnc = Vnc("tcp", display=int(vnc_opt.canonical))
            b.add("-vnc", f"127.0.0.1:{vnc_opt.canonical},password=on")

    host_ports = _network(b, by, ctx)
    if ctx.seed:
        _seed(b, by, machine.canonical if machine else "pc", ctx.seed)
    if ctx.agent:
        ga = b.resource("agent")
        b.add("-chardev", f"socket,id=kgqga,fd={ga.fd},server=on,wait=off")
        b.add("-device", "virtio-serial-pci,id=kgqgaser")
        b.add("-device", _json({"driver": "virtserialport", "bus": "kgqgaser.0", "chardev": "kgqga",
                                "name": "org.qemu.guest_agent.0"}))  # fmt: skip
    if ctx.owner_map:
        _owner_map(b, *ctx.owner_map)
    pidfiles = tuple(v.canonical for v in by.get("-pidfile", []))
    dirs = tuple((n, v.canonical) for n in ("-tftp", "-smb") for v in by.get(n, []))
    return Plan(
        tuple(b.argv), tuple(b.resources), memory, pidfiles, dirs, vnc, snapshot, host_ports, ctx.incoming,
        accel == "tcg",
    )  # fmt: skip


# QEMU's config syntax: one `name = "value"` per line of at most 1023 bytes, no `"`
# inside a value, no way to escape one.
CONFIG_VALUE_MAX = 1000


def _append(b: _Builder, cmdline: str) -> None:
    """The kernel command line is the user's text (tokens, secrets): put it where
    other users cannot read it. /proc/PID/cmdline is world-readable, so it goes
    in a config file QEMU reads through a descriptor (`[machine] append`). A line
    QEMU's config syntax cannot carry (a `"`, more than CONFIG_VALUE_MAX bytes)
    stays on the command line (docs/security.md, "Hidden command lines")."""
    if '"' in cmdline or len(cmdline) > CONFIG_VALUE_MAX:
        b.add("-append", cmdline)
        return
    r = b.resource("config", text=f'[machine]\n  append = "{cmdline}"\n')
    b.add("-readconfig", f"/proc/self/fd/{r.fd}")


def _file_node(b: _Builder, r: Resource, node: str, readonly: bool) -> None:
    b.add("-add-fd", f"fd={r.fd},set={r.fd},opaque={node}")
    b.add(
        "-blockdev",
        _json({"driver": "file", "node-name": f"{node}-file", "filename": f"/dev/fdset/{r.fd}", "read-only": readonly}),
    )


def _disk(
    b: _Builder,
    opt: str,
    path: str,
    snapshot: bool,
    geometry: g.Value | None,
    base: BaseImage | None = None,
    stop_on_error: bool = False,
) -> None:
    driver, bus, unit = _DISK_SLOTS[opt]
    node = opt.lstrip("-")
    fmt = "qcow2" if base else disk_format(path)
    readonly = opt == "-cdrom"
    # -snapshot: the image is opened read-only and a private overlay takes the writes,
    # so the user's image is provably never written.
    base_ro = readonly or snapshot
    r = b.resource("disk", path=path, writable=not base_ro, fmt=fmt, of=node, backing=base.backing if base else None)
    _file_node(b, r, node, base_ro)
    fmt_node: dict[str, object] = {
        "driver": fmt,
        "node-name": f"{node}-fmt",
        "file": f"{node}-file",
        "read-only": base_ro,
    }
    if base:
        # The library image, read-only below the VM's own overlay: the chain is
        # built here from descriptors, never from the name in the overlay's header.
        br = b.resource("base", path=base.path, fmt="qcow2", of=node)
        _file_node(b, br, f"{node}-base", True)
        b.add(
            "-blockdev",
            _json({"driver": "qcow2", "node-name": f"{node}-base", "file": f"{node}-base-file",
                   "read-only": True, "backing": None}),
        )  # fmt: skip
        fmt_node["backing"] = f"{node}-base"
    elif fmt == "qcow2":
        fmt_node["backing"] = None
    b.add("-blockdev", _json(fmt_node))
    top = f"{node}-fmt"
    if snapshot and not readonly:
        ov = b.resource("overlay", writable=True, fmt="qcow2", of=node)
        b.add("-add-fd", f"fd={ov.fd},set={ov.fd},opaque={node}-overlay")
        b.add(
            "-blockdev", _json({"driver": "file", "node-name": f"{node}-ovl-file", "filename": f"/dev/fdset/{ov.fd}"})
        )
        b.add(
            "-blockdev",
            _json({"driver": "qcow2", "node-name": f"{node}-ovl", "file": f"{node}-ovl-file", "backing": top}),
        )
        top = f"{node}-ovl"
    dev: dict[str, object] = {"driver": driver, "drive": top, "id": node}
    if stop_on_error and not readonly and driver != "floppy":  # a floppy has no error policy
        # Past the owner's disk quota (RLIMIT_FSIZE) a write fails: the VM pauses
        # (status "io-error") instead of the guest seeing a failed disk.
        dev["werror"] = "stop"
    if bus:
        dev.update(bus=bus, unit=unit)
    else:
        dev["unit"] = unit
    if isinstance(geometry, g.Geometry):
        dev.update(cyls=geometry.cyls, heads=geometry.heads, secs=geometry.secs)
        if geometry.trans:
            dev["bios-chs-trans"] = geometry.trans
    b.add("-device", _json(dev))


def _seed(b: _Builder, by: dict[str, list[g.Value]], machine: str, seed: Seed) -> None:
    """The cloud-init NoCloud seed: a read-only CD (ISO 9660 labelled `cidata`)
    the launcher builds in memory at each start. It takes the IDE slot of the
    second channel's slave (pc) or the third AHCI port (q35)."""
    if machine == "q35":
        bus, unit = "ide.2", 0
    else:
        if "-hdd" in by:
            raise PolicyError("-hdd", "this VM's cloud-init seed uses the slot of -hdd")
        bus, unit = "ide.1", 1
    r = b.resource("seed", of="seed", text=_json({**seed._asdict(), "macs": b.macs}))
    _file_node(b, r, "seed", True)
    b.add("-blockdev", _json({"driver": "raw", "node-name": "seed-fmt", "file": "seed-file", "read-only": True}))
    b.add("-device", _json({"driver": "ide-cd", "drive": "seed-fmt", "id": "seed", "bus": bus, "unit": unit}))


def _owner_map(b: _Builder, rundir: str, networks: tuple[str, ...]) -> None:
    """A service VM's owner map (model.ownermap): a read-only disk the helper
    rewrites in place, and a small writable one for the guest's answer. Virtio
    with fixed serials, so the guest finds them at /dev/disk/by-id/virtio-SERIAL.
    The helper makes both files, root's, in RUN/<key>/; QEMU gets descriptors."""
    disks: tuple[tuple[ResourceKind, str, bool], ...] = (("ownermap", "kgmap", False), ("ownerack", "kgack", True))
    for kind, node, writable in disks:
        r = b.resource(kind, path=f"{rundir}/{kind}", writable=writable, text=" ".join(networks))
        _file_node(b, r, node, not writable)
        b.add("-blockdev", _json({"driver": "raw", "node-name": f"{node}-fmt", "file": f"{node}-file",
                                  "read-only": not writable}))  # fmt: skip
        b.add("-device", _json({"driver": "virtio-blk-pci", "drive": f"{node}-fmt", "id": node,
                                "serial": f"kvmgate-{kind}"}))  # fmt: skip


def _network(b: _Builder, by: dict[str, list[g.Value]], ctx: Context) -> bool:
    """Either the admin's named networks (`ctx.nics`) or the note's legacy `-net`
    VLANs, which become hubs of today's netdevs. No -net at all means the note's
    default, `-net nic -net user`; `-net none` means no network. Returns whether
    QEMU forwards host ports (--forward, -redir) on its user network."""
    if ctx.nics:
        _named_networks(b, by, ctx)
        return bool(ctx.forwards or by.get("-redir"))
    nets = [v for v in by.get("-net", []) if isinstance(v, g.NetSpec)]
    if any(n.kind == "none" for n in nets):
        if len(nets) > 1:
            raise PolicyError("-net", "none cannot be combined with other -net options")
        nets = []
    elif not nets:
        nets = [g.parse_net("-net", "nic", g.Limits()), g.parse_net("-net", "user", g.Limits())]
    users = [n for n in nets if n.kind == "user"]
    _needs_user_net(by, ctx, bool(users))

    vlans: dict[str, tuple[list[g.NetSpec], list[g.NetSpec]]] = {}
    for n in nets:
        nics, backends = vlans.setdefault(n.get("vlan") or "0", ([], []))
        (nics if n.kind == "nic" else backends).append(n)

    nic_index = 0
    for vlan, (nics, backends) in vlans.items():
        ids = []
        for j, be in enumerate(backends):
            nid = f"kgnet{vlan}b{j}"
            ids.append(nid)
            first = bool(users) and be is users[0]
            b.add("-netdev", _backend(b, be, nid, by if first else {}, ctx if first else None))
        direct = len(nics) == 1 and len(backends) == 1
        if not direct:
            for j, nid in enumerate(ids):
                b.add("-netdev", f"hubport,id=kghub{vlan}b{j},hubid={vlan},netdev={nid}")
        for j, nic in enumerate(nics):
            model = g.NIC_MODELS[nic.get("model") or "virtio"]
            mac = nic.get("macaddr") or mac_for(ctx.key, nic_index)
            nic_index += 1
            if direct:
                netdev = ids[0]
            else:
                netdev = f"kghub{vlan}n{j}"
                b.add("-netdev", f"hubport,id={netdev},hubid={vlan}")
            b.macs.append(mac)
            b.add("-device", _json({"driver": model, "netdev": netdev, "mac": mac}))
    return bool(users) and bool(ctx.forwards or by.get("-redir"))


def _needs_user_net(by: dict[str, list[g.Value]], ctx: Context, has_user: bool) -> None:
    if has_user:
        return
    for opt in ("-tftp", "-smb", "-redir"):
        if opt in by:
            raise PolicyError(opt, "needs -net user")
    if ctx.forwards:
        raise PolicyError("--forward", "needs the user network (QEMU's user-mode NAT forwards the ports)")


def _named_networks(b: _Builder, by: dict[str, list[g.Value]], ctx: Context) -> None:
    """One virtio NIC per named network, with the MAC kvmgate allocated for it.
    Bridged NICs get a tap the helper creates and passes as an fd."""
    if "-net" in by:
        raise PolicyError("-net", "this VM is on named networks (--network); -net cannot be added")
    users = [p for p in ctx.nics if p.nic.tap is None]
    _needs_user_net(by, ctx, bool(users))
    for i, port in enumerate(ctx.nics):
        nid = f"kgnic{i}"
        if port.nic.tap is None:
            user = g.NetSpec("user", "user")
            first = port is users[0]
            b.add("-netdev", _backend(b, user, nid, by if first else {}, ctx if first else None))
        else:
            r = b.resource("tap", path=port.nic.tap, writable=True, bridge=port.bridge, isolated=port.isolated)
            b.add("-netdev", f"tap,id={nid},fd={r.fd}")
        b.macs.append(port.nic.mac)
        b.add("-device", _json({"driver": "virtio-net-pci", "netdev": nid, "mac": port.nic.mac}))


def _backend(b: _Builder, be: g.NetSpec, nid: str, extras: dict[str, list[g.Value]], fw: Context | None) -> str:
    if be.kind == "user":
        props = [f"user,id={nid}"]
        host = be.get("hostname")
        if host:
            props.append(f"hostname={host}")
        for v in extras.get("-tftp", []):
            props.append(f"tftp={keyval_escape(v.canonical)}")
        for v in extras.get("-smb", []):
            props.append(f"smb={keyval_escape(v.canonical)}")
        for v in extras.get("-redir", []):
            assert isinstance(v, g.Redir)
            props.append(f"hostfwd={v.proto}:127.0.0.1:{v.host_port}-{v.guest_addr}:{v.guest_port}")
        for f in fw.forwards if fw is not None else ():
            assert fw is not None
            # With wake on connect, gated owns the pool port and QEMU listens on the internal one.
            bind, port = ("127.0.0.1", f.internal) if f.internal else (fw.forward_bind, f.port)
            props.append(f"hostfwd=tcp:{bind}:{port}-:{f.guest}")
        return ",".join(props)
    if be.kind == "tap":
        r = b.resource("tap", path=be.get("ifname"), writable=True)
        return f"tap,id={nid},fd={r.fd}"
    if be.kind == "socket":
        for key in ("listen", "connect", "mcast"):
            addr = be.get(key)
            if addr:
                return f"socket,id={nid},{key}={addr}"
    raise PolicyError("-net", f"cannot translate {be.kind}")
