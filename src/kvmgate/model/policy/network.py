"""The admin's network vocabulary: named networks, the forwarded-port pool, VNC.

Pure: parsed from the policy file's `[networks.NAME]`, `[ports]`, `[vnc]` and
`[host]` tables, checked for everything that would otherwise fail half-way
through building a bridge (interface names longer than IFNAMSIZ, overlapping
pools, subnets too small to hand out addresses).

Kinds of network:
- `user`: QEMU's user-mode NAT (SLIRP). Always defined; the default.
- `private`: one bridge per owner, `<ifprefix>p<uid in hex>`: an owner's VMs see
  each other and nothing else. The host has no address on it; guests choose
  their own addresses (IPv6 link-local works with no set-up).
- `services`: one host bridge. User VMs sit on isolated ports (they reach only
  non-isolated ports: service VMs and the host's DHCP server), service VMs on
  normal ports. Addresses come from kvmgate's dnsmasq, one fixed address per
  MAC; nothing else gets a lease.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from kvmgate.errors import PolicyError
from kvmgate.model.regex import Regex

IFNAMSIZ = 15  # usable characters of a Linux interface name
NetKind = Literal["user", "private", "services"]
KINDS: tuple[NetKind, ...] = ("user", "private", "services")
VncMode = Literal["unix", "tcp"]

_NAME = Regex(r"[a-z][a-z0-9]{0,15}", re.ASCII)
_IFNAME = Regex(r"[a-z][a-z0-9]*", re.ASCII)
_PREFIX = Regex(r"[a-z]{1,4}", re.ASCII)
_BIND = ("127.0.0.1", "0.0.0.0")  # noqa: S104 - only when the admin asks for public ports


def ip_to_int(text: str) -> int:
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    if any(int(p) > 255 or (len(p) > 1 and p[0] == "0") for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    a, b, c, d = (int(p) for p in parts)
    return (a << 24) | (b << 16) | (c << 8) | d


def int_to_ip(n: int) -> str:
    return ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))


class Subnet(NamedTuple):
    network: int  # address as an integer, host bits zero
    prefix: int

    @classmethod
    def parse(cls, text: str) -> Subnet:
        addr, sep, plen = text.partition("/")
        if not sep or not plen.isdigit() or not 16 <= int(plen) <= 29:
            raise ValueError("subnet must be a.b.c.d/N with N between 16 and 29")
        n, p = ip_to_int(addr), int(plen)
        if n & ((1 << (32 - p)) - 1):
            raise ValueError("subnet has host bits set")
        return cls(n, p)

    @property
    def netmask(self) -> str:
        return int_to_ip((0xFFFFFFFF << (32 - self.prefix)) & 0xFFFFFFFF)

    @property
    def gateway(self) -> str:
        """The host's address on the bridge (it serves DHCP there, and only that)."""
        return int_to_ip(self.network + 1)

    def hosts(self) -> range:
        """Addresses kvmgate hands to VMs: all but network, host and broadcast."""
        return range(self.network + 2, self.network + (1 << (32 - self.prefix)) - 1)

    def __str__(self) -> str:
        return f"{int_to_ip(self.network)}/{self.prefix}"


# VXLAN's own port (4789) is one any user may bind: a user on a node would hear the
# tunnel, or keep the kernel from binding it. kvmgate's tunnels use a privileged one,
# as source and destination, and a node drops tunnel packets from unprivileged ports.
VXLAN_PORT = 789


class Network(NamedTuple):
    name: str
    kind: NetKind
    bridge: str = ""  # services: the bridge's name
    subnet: Subnet | None = None  # services: addresses handed out by dnsmasq
    vxlan: int | None = None  # services on a Slurm cluster: the VXLAN id joining the nodes' bridges
    peers: tuple[str, ...] = ()  # the VM nodes' addresses (each node finds its own among them)
    vxlan_port: int = VXLAN_PORT

    def tunnel(self, ifprefix: str) -> str | None:
        """The VXLAN device on this network's bridge (`<ifprefix>v<id in hex>`)."""
        return None if self.vxlan is None else f"{ifprefix}v{self.vxlan:x}"

    def bridge_for(self, ifprefix: str, owner_uid: int) -> str:
        """The bridge a VM of `owner_uid` joins: unique per owner on private networks
        (the uid itself, in hex: no hash, so no two owners can ever share one)."""
        if self.kind == "private":
            return f"{ifprefix}p{owner_uid:x}"
        return self.bridge

    @property
    def bridged(self) -> bool:
        return self.kind != "user"


class Ports(NamedTuple):
    pool: tuple[int, int] = (20000, 20999)  # host ports for `--forward`
    bind: str = "127.0.0.1"  # where forwarded ports listen
    protect: bool = True  # nftables: on this host, only the owner (and root) may connect
    internal: tuple[int, int] = (40000, 40999)  # loopback ports between kvmgate-gated and QEMU

    def in_pool(self, port: int) -> bool:
        return self.pool[0] <= port <= self.pool[1]


class HostNet(NamedTuple):
    """Everything network-shaped in the policy."""

    networks: Mapping[str, Network]
    ports: Ports = Ports()
    vnc: VncMode = "unix"
    ifprefix: str = "kg"  # taps are <ifprefix>t<n>, private bridges <ifprefix>p<uid>

    @property
    def nft_table(self) -> str:
        return f"kvmgate_{self.ifprefix}"

    def network(self, name: str) -> Network:
        net = self.networks.get(name)
        if net is None:
            raise PolicyError("--network", f"no network {name!r} in the policy (have: {', '.join(self.networks)})")
        return net


DEFAULT_NETWORKS: dict[str, Network] = {
    "user": Network("user", "user"),
    "private": Network("private", "private"),
    "services": Network("services", "services", "kgsvc0", Subnet.parse("10.77.0.0/24")),
}


def default() -> HostNet:
    return HostNet(MappingProxyType(DEFAULT_NETWORKS))


def _fail(msg: str) -> PolicyError:
    return PolicyError("policy", msg)


def _range(value: Any, key: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 1024 <= value[0] <= value[1] <= 65535
    ):
        raise _fail(f"{key} must be [first, last] ports within 1024..65535")
    return value[0], value[1]


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise _fail(f"[{key}] must be a table")
    return value


def _only(table: Mapping[str, Any], where: str, keys: set[str]) -> None:
    extra = set(table) - keys
    if extra:
        raise _fail(f"unknown key {where}.{sorted(extra)[0]}")


def parse(data: Mapping[str, Any]) -> HostNet:
    """`data` is the whole policy dict; only the network tables are read."""
    host = _table(data, "host")
    _only(host, "host", {"ifprefix"})
    ifprefix = host.get("ifprefix", "kg")
    if not isinstance(ifprefix, str) or not _PREFIX.fullmatch(ifprefix):
        raise _fail("host.ifprefix must be 1 to 4 lowercase letters")

    ports_t = _table(data, "ports")
    _only(ports_t, "ports", {"pool", "bind", "protect", "internal"})
    ports = Ports()
    pool = _range(ports_t["pool"], "ports.pool") if "pool" in ports_t else ports.pool
    internal = _range(ports_t["internal"], "ports.internal") if "internal" in ports_t else ports.internal
    if not (pool[1] < internal[0] or internal[1] < pool[0]):
        raise _fail("ports.pool and ports.internal overlap")
    bind = ports_t.get("bind", ports.bind)
    if bind not in _BIND:
        raise _fail("ports.bind must be 127.0.0.1 (this host only) or 0.0.0.0 (every address)")
    protect = ports_t.get("protect", ports.protect)
    if not isinstance(protect, bool):
        raise _fail("ports.protect must be true or false")
    ports = Ports(pool, bind, protect, internal)

    vnc_t = _table(data, "vnc")
    _only(vnc_t, "vnc", {"mode"})
    vnc = vnc_t.get("mode", "unix")
    if vnc not in ("unix", "tcp"):
        raise _fail("vnc.mode must be unix (a socket only the owner can open) or tcp (loopback, with a password)")

    nets_t = _table(data, "networks")
    networks = dict(DEFAULT_NETWORKS) if "networks" not in data else {"user": DEFAULT_NETWORKS["user"]}
    bridges: dict[str, str] = {}
    subnets: list[tuple[Subnet, str]] = []
    vnis: set[int] = set()
    for name, spec in nets_t.items():
        where = f"networks.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _fail(f"{where}: names are 1-16 lowercase letters and digits")
        if not isinstance(spec, Mapping):
            raise _fail(f"[{where}] must be a table")
        _only(spec, where, {"type", "bridge", "subnet", "vxlan", "peers", "vxlan_port"})
        kind = spec.get("type")
        if kind not in KINDS:
            raise _fail(f"{where}.type must be one of " + ", ".join(KINDS))
        if name == "user" and kind != "user":
            raise _fail("networks.user is QEMU's user-mode network and cannot be redefined")
        if kind != "services" and ({"bridge", "subnet", "vxlan", "peers", "vxlan_port"} & set(spec)):
            raise _fail(f"{where}: only services networks take bridge, subnet and vxlan")
        if kind != "services":
            networks[name] = Network(name, kind)
            continue
        bridge = spec.get("bridge")
        if not isinstance(bridge, str) or not _IFNAME.fullmatch(bridge):
            raise _fail(f"{where}.bridge must be an interface name (lowercase letters and digits)")
        if len(bridge) > IFNAMSIZ:
            raise _fail(f"{where}.bridge {bridge!r} is longer than {IFNAMSIZ} characters (IFNAMSIZ)")
        if bridge.startswith(ifprefix + "t") or bridge.startswith(ifprefix + "p"):
            raise _fail(f"{where}.bridge must not start with {ifprefix}t or {ifprefix}p (kvmgate's own names)")
        if bridge in bridges:
            raise _fail(f"{where}.bridge {bridge!r} is also networks.{bridges[bridge]}'s bridge")
        bridges[bridge] = name
        try:
            subnet = Subnet.parse(spec.get("subnet", ""))
        except (ValueError, AttributeError) as err:
            raise _fail(f"{where}.subnet: {err}") from None
        for other, oname in subnets:
            shorter = min(subnet.prefix, other.prefix)
            if subnet.network >> (32 - shorter) == other.network >> (32 - shorter):
                raise _fail(f"{where}.subnet overlaps networks.{oname}.subnet")
        subnets.append((subnet, name))
        networks[name] = Network(name, "services", bridge, subnet, *_vxlan(spec, where, subnet, vnis))
    return HostNet(MappingProxyType(networks), ports, vnc, ifprefix)


def _vxlan(
    spec: Mapping[str, Any], where: str, subnet: Subnet, vnis: set[int]
) -> tuple[int | None, tuple[str, ...], int]:
    """A services network that spans a Slurm cluster's VM nodes (docs/cluster.md):
    its VXLAN id, the nodes' addresses, the UDP port."""
    if "vxlan" not in spec:
        if "peers" in spec or "vxlan_port" in spec:
            raise _fail(f"{where}: peers and vxlan_port need vxlan")
        return None, (), VXLAN_PORT
    vni, peers, port = spec["vxlan"], spec.get("peers"), spec.get("vxlan_port", VXLAN_PORT)
    if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni < 1 << 24 or vni in vnis:
        raise _fail(f"{where}.vxlan must be a VXLAN id (1-16777215), one per network")
    vnis.add(vni)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 1022:
        raise _fail(f"{where}.vxlan_port must be a privileged UDP port (1-1022): no user can bind it")
    if not isinstance(peers, list) or not 2 <= len(peers) <= 256:
        raise _fail(f"{where}.peers must list the VM nodes' addresses (2 to 256)")
    canonical = []
    for peer in peers:
        try:
            n = ip_to_int(peer) if isinstance(peer, str) else -1
        except ValueError:
            n = -1
        if n < 0 or int_to_ip(n) != peer or subnet.network <= n < subnet.network + (1 << (32 - subnet.prefix)):
            raise _fail(f"{where}.peers: {str(peer)[:40]!r} is not a node address (a.b.c.d outside the subnet)")
        canonical.append(peer)
    if len(set(canonical)) != len(canonical):
        raise _fail(f"{where}.peers lists an address twice")
    return vni, tuple(canonical), port


# Named services for `--forward`: what admins type instead of port numbers.
SERVICES = {"ssh": 22, "http": 80, "https": 443, "rdp": 3389, "vnc": 5900, "smb": 445}
_SERVICE_NAME = Regex(r"[a-z][a-z0-9-]{0,15}", re.ASCII)


class ForwardRequest(NamedTuple):
    service: str
    guest: int
    port: int | None  # a host port the admin asked for; None: allocate from the pool


def parse_forwards(spec: str, ports: Ports) -> list[ForwardRequest]:
    """`ssh`, `http@20080`, `web=8080`, `8080@20081`, comma-separated; `none` is empty."""
    if spec == "none":
        return []
    out: list[ForwardRequest] = []
    for item in spec.split(","):
        what, at, host = item.partition("@")
        name, eq, guest_text = what.partition("=")
        if not eq and name.isdigit():
            name, guest_text = f"tcp{name}", name
        elif not eq:
            guest_text = str(SERVICES.get(name, ""))
        if not _SERVICE_NAME.fullmatch(name) or not guest_text.isdigit() or not 1 <= int(guest_text) <= 65535:
            known = ", ".join(SERVICES)
            raise PolicyError("--forward", f"{item[:40]!r}: use a service ({known}), NAME=GUESTPORT or GUESTPORT")
        port = None
        if at:
            if not host.isdigit() or not ports.in_pool(int(host)):
                raise PolicyError(
                    "--forward", f"{item[:40]!r}: host port must be within the pool {ports.pool[0]}-{ports.pool[1]}"
                )
            port = int(host)
        if any(f.service == name for f in out):
            raise PolicyError("--forward", f"{name} given twice")
        out.append(ForwardRequest(name, int(guest_text), port))
    return out
