"""Typed value grammars, one per kind of option value.

Every parser takes the raw string and the policy's limits, and returns a value
whose `canonical` string is what the VM identity stores. Anything outside the
grammar raises `PolicyError` naming the option. Parsers never touch the host.
The point of a grammar is that no value can ever be read by QEMU as its own
syntax: no commas, no `key=`, no protocol prefixes, no leading dashes, no
control characters reach QEMU from a value; paths never reach QEMU at all
(they become file descriptors).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kvmgate.errors import PolicyError
from kvmgate.model.regex import Regex


class Limits(NamedTuple):
    """Admin-set bounds that grammars check against (from the policy file)."""

    mem_min_mib: int = 16
    mem_max_mib: int = 16384
    smp_max: int = 4
    vnc_min: int = 1
    vnc_max: int = 99
    machines: tuple[str, ...] = ("pc", "q35")
    append_max: int = 2048
    image_max_gib: int = 256  # a user image's virtual size (qcow2 header, raw file size)
    snapshot_max_mib: int = 16384  # all -snapshot overlays of one VM together, while it runs
    blobs_max_mib: int = 1024  # kernels, initrds, ROMs copied into memory for one start
    repeat_max: int = 32  # uses of one repeatable option (-option-rom, -net, ...) in one list
    import_max_minutes: int = 240  # one qemu-img run of an import, a library add or a flattening
    keys_max_kib: int = 64  # the owner's ssh public keys read for a cloud-init seed, all files together


# --------------------------------------------------------------------------- values


# Values are NamedTuples, not dataclasses: building ~10 dataclasses costs the
# helper more start-up time than everything else it imports (see bench/).
# Every value's first field is `canonical`, the form the VM identity stores.


class Flag(NamedTuple):
    canonical: str


class PathValue(NamedTuple):
    canonical: str
    path: str


class IntValue(NamedTuple):
    canonical: str
    number: int


class Word(NamedTuple):
    """A value from a small closed set or a strict token regex."""

    canonical: str
    word: str


class Geometry(NamedTuple):
    canonical: str
    cyls: int
    heads: int
    secs: int
    trans: str | None


class NetSpec(NamedTuple):
    canonical: str
    kind: str
    props: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        return dict(self.props).get(key)


class Redir(NamedTuple):
    canonical: str
    proto: str
    host_port: int
    guest_addr: str
    guest_port: int


class Channel(NamedTuple):
    canonical: str
    name: str
    backend: str


class Words(NamedTuple):
    canonical: str
    words: tuple[str, ...]


Value = Flag | PathValue | IntValue | Word | Geometry | NetSpec | Redir | Channel | Words


# ------------------------------------------------------------------------ helpers

_CONTROL = Regex(r"[\x00-\x1f\x7f]")
# Anything that looks like `proto:` at the start: json:, nbd:, fat:, http:, file: ...
_PROTOCOL = Regex(r"[A-Za-z][A-Za-z0-9+.-]*:")
PATH_MAX = 4095


def _fail(option: str, reason: str) -> PolicyError:
    return PolicyError(option, reason)


def _no_control(option: str, raw: str) -> None:
    if _CONTROL.search(raw):
        raise _fail(option, "control characters (newline, NUL, ...) are not allowed")


def looks_like_protocol(raw: str) -> bool:
    return _PROTOCOL.match(raw) is not None


def parse_flag(option: str, raw: str | None, limits: Limits) -> Flag:
    if raw is not None:
        raise _fail(option, "takes no value")
    return Flag("")


def parse_path(option: str, raw: str, limits: Limits) -> PathValue:
    """An absolute host path. The front end makes relative paths absolute in the
    caller's own cwd; the helper accepts absolute paths only, so no cwd or protocol
    prefix (`fat:`, `json:`, `nbd:`) can ever be interpreted by anyone."""
    _no_control(option, raw)
    if looks_like_protocol(raw):
        raise _fail(option, f"protocol prefixes are not allowed ({raw.split(':', 1)[0]}:)")
    if not raw.startswith("/"):
        raise _fail(option, "must be an absolute path")
    if len(raw.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise _fail(option, "path too long")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    norm = "/" + "/".join(parts)
    return PathValue(norm, norm)


_MIB = Regex(r"([0-9]{1,7})([MG]?)", re.ASCII)


def parse_mem(option: str, raw: str, limits: Limits) -> IntValue:
    m = _MIB.fullmatch(raw)
    if not m:
        raise _fail(option, "must be a size in MiB, e.g. 256, 256M or 2G")
    mib = int(m.group(1)) * (1024 if m.group(2) == "G" else 1)
    if not limits.mem_min_mib <= mib <= limits.mem_max_mib:
        raise _fail(option, f"must be between {limits.mem_min_mib} and {limits.mem_max_mib} MiB")
    return IntValue(str(mib), mib)


def _int(option: str, raw: str, lo: int, hi: int, what: str = "number") -> int:
    if not re.fullmatch(r"[0-9]{1,6}", raw, re.ASCII):
        raise _fail(option, f"must be a {what}")
    n = int(raw)
    if not lo <= n <= hi:
        raise _fail(option, f"must be between {lo} and {hi}")
    return n


def parse_smp(option: str, raw: str, limits: Limits) -> IntValue:
    n = _int(option, raw, 1, limits.smp_max)
    return IntValue(str(n), n)


def parse_port(option: str, raw: str, limits: Limits) -> IntValue:
    n = _int(option, raw, 1, 65535, "port number")
    return IntValue(str(n), n)


def parse_boot(option: str, raw: str, limits: Limits) -> Word:
    """`[acdn]+`: floppy, hard disk, CD-ROM, network; each at most once."""
    if not re.fullmatch(r"[acdn]{1,4}", raw, re.ASCII) or len(set(raw)) != len(raw):
        raise _fail(option, "must be boot devices from a, c, d, n (each at most once)")
    return Word(raw, raw)


def parse_vnc(option: str, raw: str, limits: Limits) -> IntValue:
    """A display number only. The host address is never the user's to choose."""
    m = re.fullmatch(r":?([0-9]{1,3})", raw, re.ASCII)
    if not m:
        raise _fail(option, "must be a display number such as :1 (addresses and sub-options are not allowed)")
    n = int(m.group(1))
    if not limits.vnc_min <= n <= limits.vnc_max:
        raise _fail(option, f"display must be between :{limits.vnc_min} and :{limits.vnc_max}")
    return IntValue(str(n), n)


_TAG = Regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)  # kvmgate snapshot's tags: VM-name grammar


def parse_tag(option: str, raw: str, limits: Limits) -> Word:
    if not _TAG.fullmatch(raw):
        raise _fail(option, "must be a snapshot tag of letters, digits, '_', '-' and '.' (at most 64)")
    return Word(raw, raw)


def parse_cmdline(option: str, raw: str, limits: Limits) -> Word:
    """A kernel command line: printable ASCII. QEMU passes it to the guest verbatim
    and never parses it, so commas are harmless here."""
    if not re.fullmatch(r"[\x20-\x7e]*", raw, re.ASCII):
        raise _fail(option, "must be printable ASCII")
    if len(raw) > limits.append_max:
        raise _fail(option, f"longer than {limits.append_max} characters")
    return Word(raw, raw)


_TRANS = ("none", "lba", "auto")


def parse_geometry(option: str, raw: str, limits: Limits) -> Geometry:
    parts = raw.split(",")
    if len(parts) not in (3, 4):
        raise _fail(option, "must be c,h,s[,t]")
    c = _int(option, parts[0], 1, 65535, "cylinder count")
    h = _int(option, parts[1], 1, 16, "head count")
    s = _int(option, parts[2], 1, 63, "sector count")
    t = parts[3] if len(parts) == 4 else None
    if t is not None and t not in _TRANS:
        raise _fail(option, "translation must be none, lba or auto")
    return Geometry(raw, c, h, s, t)


def parse_word(choices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def parse(option: str, raw: str, limits: Limits) -> Word:
        if raw not in choices:
            raise _fail(option, "must be one of " + ", ".join(choices))
        return Word(raw, raw)

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def parse_machine(option: str, raw: str, limits: Limits) -> Word:
    if raw not in limits.machines:
        raise _fail(option, "machine must be one of " + ", ".join(limits.machines))
    return Word(raw, raw)


def parse_keymap(option: str, raw: str, limits: Limits) -> Word:
    if not re.fullmatch(r"[a-z]{2}(-[a-z]{2,3})?", raw, re.ASCII):
        raise _fail(option, "must be a keymap name such as fr or en-us")
    return Word(raw, raw)


SOUND_CARDS = {"ac97": "AC97", "hda": "intel-hda", "es1370": "ES1370", "sb16": "sb16"}
LOG_ITEMS = ("guest_errors", "unimp", "cpu_reset", "int", "exec", "in_asm", "out_asm")


def _word_list(option: str, raw: str, allowed: tuple[str, ...]) -> Words:
    items = raw.split(",")
    if not items or any(i not in allowed for i in items) or len(set(items)) != len(items):
        raise _fail(option, "must be a comma-separated list of " + ", ".join(allowed))
    return Words(",".join(items), tuple(items))


def parse_soundhw(option: str, raw: str, limits: Limits) -> Words:
    return _word_list(option, raw, tuple(SOUND_CARDS))


def parse_log_items(option: str, raw: str, limits: Limits) -> Words:
    return _word_list(option, raw, LOG_ITEMS)


# ----------------------------------------------------------------------- networking

NIC_MODELS = {
    "virtio": "virtio-net-pci",
    "e1000": "e1000",
    "rtl8139": "rtl8139",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
    "i82559er": "i82559er",
}
_MAC = Regex(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", re.ASCII)
_HOST = Regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_IPV4 = Regex(
    r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}", re.ASCII
)
_IFNAME = Regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", re.ASCII)


def _vlan(option: str, raw: str) -> str:
    return str(_int(option, raw, 0, 15, "vlan number"))


def _mac(option: str, raw: str) -> str:
    low = raw.lower()
    if not _MAC.fullmatch(low) or int(low[:2], 16) & 1:
        raise _fail(option, "macaddr must be a unicast MAC such as 52:54:00:12:34:56")
    return low


def _model(option: str, raw: str) -> str:
    if raw not in NIC_MODELS:
        raise _fail(option, "model must be one of " + ", ".join(NIC_MODELS))
    return raw


def _hostname(option: str, raw: str) -> str:
    if not _HOST.fullmatch(raw):
        raise _fail(option, "hostname must be a DNS label")
    return raw


def _ifname(option: str, raw: str) -> str:
    if not _IFNAME.fullmatch(raw):
        raise _fail(option, "ifname must be an interface name of at most 15 characters")
    return raw


def _script(option: str, raw: str) -> str:
    if raw != "no":
        raise _fail(option, "script must be 'no': kvmgate never runs network scripts")
    return raw


def _fd(option: str, raw: str) -> str:
    raise _fail(option, "fd= is not allowed: kvmgate opens and passes descriptors itself")


def _hostport(option: str, raw: str, host_required: bool) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or (host_required and not host):
        raise _fail(option, "must be host:port")
    if host and not (_IPV4.fullmatch(host) or _HOST.fullmatch(host)):
        raise _fail(option, "host must be an IPv4 address or a host name")
    p = _int(option, port, 1, 65535, "port number")
    return f"{host}:{p}"


def _listen(option: str, raw: str) -> str:
    return _hostport(option, raw, host_required=False)


def _connect(option: str, raw: str) -> str:
    return _hostport(option, raw, host_required=True)


def _mcast(option: str, raw: str) -> str:
    v = _hostport(option, raw, host_required=True)
    first = int(v.split(".")[0]) if _IPV4.fullmatch(v.split(":")[0]) else 0
    if not 224 <= first <= 239:
        raise _fail(option, "mcast must be a multicast IPv4 address and port")
    return v


_NET_KEYS = {
    "nic": {"vlan": _vlan, "macaddr": _mac, "model": _model},
    "user": {"vlan": _vlan, "hostname": _hostname},
    "tap": {"vlan": _vlan, "fd": _fd, "ifname": _ifname, "script": _script},
    "socket": {"vlan": _vlan, "fd": _fd, "listen": _listen, "connect": _connect, "mcast": _mcast},
    "none": {},
}


def parse_net(option: str, raw: str, limits: Limits) -> NetSpec:
    """`-net KIND[,key=value]...` with exactly the sub-options the design note lists."""
    _no_control(option, raw)
    kind, *rest = raw.split(",")
    if kind not in _NET_KEYS:
        raise _fail(option, "kind must be one of " + ", ".join(_NET_KEYS))
    keys = _NET_KEYS[kind]
    props: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise _fail(option, f"{kind}: unknown sub-option {key!r}")
        if key in props:
            raise _fail(option, f"{kind}: {key} given twice")
        props[key] = keys[key](option, value)
    if kind == "socket" and sum(k in props for k in ("listen", "connect", "mcast")) != 1:
        raise _fail(option, "socket needs exactly one of listen=, connect=, mcast=")
    if kind == "tap" and "ifname" not in props:
        raise _fail(option, "tap needs ifname=")
    order = list(keys)
    canon = tuple(sorted(props.items(), key=lambda kv: order.index(kv[0])))
    text = ",".join([kind] + [f"{k}={v}" for k, v in canon])
    return NetSpec(text, kind, canon)


def parse_redir(option: str, raw: str, limits: Limits) -> Redir:
    """`[tcp|udp]:host-port:[guest-host]:guest-port`."""
    m = re.fullmatch(r"(?:(tcp|udp):)?([0-9]{1,5}):([0-9.]*):([0-9]{1,5})", raw, re.ASCII)
    if not m:
        raise _fail(option, "must be [tcp|udp]:host-port:[guest-host]:guest-port")
    proto = m.group(1) or "tcp"
    hp = _int(option, m.group(2), 1, 65535, "port number")
    guest = m.group(3)
    if guest and not _IPV4.fullmatch(guest):
        raise _fail(option, "guest-host must be an IPv4 address")
    gp = _int(option, m.group(4), 1, 65535, "port number")
    return Redir(f"{proto}:{hp}:{guest}:{gp}", proto, hp, guest, gp)


def parse_vmchannel(option: str, raw: str, limits: Limits) -> Channel:
    """`di:NAME,null`: a named virtio-serial port. The only host end allowed is null:
    a channel to anything else would bypass kvmgate's control of the host side."""
    m = re.fullmatch(r"di:([a-z0-9][a-z0-9._-]{0,31}),(null)", raw, re.ASCII)
    if not m:
        raise _fail(option, "must be di:NAME,null")
    return Channel(raw, m.group(1), m.group(2))


def parse_monitor(option: str, raw: str, limits: Limits) -> Word:
    if raw != "none":
        raise _fail(option, "only 'none': the monitor belongs to kvmgate (QMP on a root-only socket)")
    return Word(raw, raw)
