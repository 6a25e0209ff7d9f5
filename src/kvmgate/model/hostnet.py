"""The host side of kvmgate's networks as text: the nftables ruleset and dnsmasq's
command line and hosts file. Pure; the helper applies them (helper/network.py).

The ruleset is regenerated whole from the registry and loaded in one nft
transaction, so it is never half-applied and is the same however often it is
loaded. Two tables, both named after the installation's interface prefix:

- `bridge`: every kvmgate tap may send only from the MAC kvmgate gave its NIC.
  On services networks also only from its address (DHCP requests from 0.0.0.0
  excepted), only IPv4 and ARP, and DHCP only about its own MAC (the payload's
  chaddr, which dnsmasq believes). Isolation between users' VMs is the bridge's
  own `isolated` port flag; these rules stop a VM from posing as another.
- `inet`: the host serves DHCP on kvmgate bridges and nothing else, routes
  nothing into or out of them, and (`ports.protect`) lets a forwarded port on
  this host be opened only by the VM's owner (and root): locally made TCP SYNs
  to a guarded port are checked against the socket owner's uid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvmgate.errors import PolicyError
from kvmgate.model.policy import grammar as g
from kvmgate.model.policy.network import HostNet, Network, int_to_ip
from kvmgate.model.settings import Settings
from kvmgate.model.translate import Port


class TapRule(NamedTuple):
    tap: str
    mac: str
    ip: str | None  # None: MAC checked only (private networks have no kvmgate addresses)
    user: bool = False  # a user VM's NIC on a services network (an isolated port)
    service: bool = False  # a service VM's NIC on a services network


class Tunnel(NamedTuple):
    """A services network's VXLAN device between the VM nodes' bridges (Slurm)."""

    dev: str
    port: int  # its UDP port
    peers: tuple[str, ...]  # the other nodes' addresses
    gateway: str  # every node's own address on the bridge (each serves DHCP to its own VMs only)


class PortRule(NamedTuple):
    port: int
    uids: tuple[int, ...]  # who may connect, besides root


CHADDR = "@th,288,48"  # BOOTP's client hardware address: UDP header (8) + op..giaddr (28) bytes in


def _elements(items: Iterable[str]) -> str:
    items = sorted(set(items))
    return f"elements = {{ {', '.join(items)} }}" if items else ""


def _set(name: str, typ: str, items: Iterable[str]) -> str:
    return f"  set {name} {{ type {typ}; {_elements(items)} }}\n"


def _q(name: str) -> str:
    return f'"{name}"'


def ruleset(
    table: str, bridges: Sequence[str], taps: Sequence[TapRule], ports: Sequence[PortRule],
    tunnels: Sequence[Tunnel] = (),
) -> str:  # fmt: skip
    """The whole kvmgate ruleset, replacing any earlier one atomically.

    Tunnels (a services network across a Slurm cluster's nodes): what arrives
    through one reaches a user VM here only from a service VM's MAC (two users'
    VMs never meet, on one node or across two); no DHCP and nothing of the nodes'
    own bridge addresses crosses (each node's dnsmasq serves its own VMs); the host
    itself never sends into one. Underneath, a node takes the tunnel's UDP port
    only from the other nodes' addresses, and no process but root's (the kernel's
    tunnel socket is root's) may send to it: an unprivileged user on a node cannot
    forge a frame for another node's bridge."""
    out = [f"table bridge {table} {{}}\ndelete table bridge {table}\n"]
    out.append(f"table bridge {table} {{\n")
    out.append(_set("guarded", "ifname", (_q(t.tap) for t in taps)))
    out.append(_set("macs", "ifname . ether_addr", (f"{_q(t.tap)} . {t.mac}" for t in taps)))
    out.append(_set("iponly", "ifname", (_q(t.tap) for t in taps if t.ip)))
    out.append(_set("ips", "ifname . ipv4_addr", (f"{_q(t.tap)} . {t.ip}" for t in taps if t.ip)))
    out.append(_set("tunnels", "ifname", (_q(t.dev) for t in tunnels)))
    out.append(_set("usertaps", "ifname", (_q(t.tap) for t in taps if t.user)))
    out.append(_set("servicemacs", "ether_addr", (t.mac for t in taps if t.service)))
    out.append(_set("gateways", "ipv4_addr", (t.gateway for t in tunnels)))
    out.append(
        "  chain prerouting {\n"
        "    type filter hook prerouting priority -300; policy accept;\n"
        "    iifname @tunnels jump from_tunnel\n"
        "    iifname != @guarded accept\n"
        "    iifname . ether saddr != @macs drop\n"
        "    ether type arp iifname . arp saddr ether != @macs drop\n"
        "    iifname != @iponly accept\n"
        "    ether type arp iifname . arp saddr ip != @ips drop\n"
        "    ether type ip udp sport 68 udp dport 67 jump dhcp\n"
        "    ether type ip iifname . ip saddr != @ips drop\n"
        "    ether type != { ip, arp } drop\n"
        "  }\n"
        # A DHCP client message speaks for the MAC in its payload (chaddr), which dnsmasq
        # believes: a DECLINE or RELEASE naming another VM's MAC would take its address
        # away. So chaddr must be the tap's own MAC; only a DISCOVER or REQUEST of a VM
        # that has no address yet may come from 0.0.0.0.
        "  chain dhcp {\n"
        "    ip saddr != 0.0.0.0 iifname . ip saddr != @ips drop\n"
        + "".join(f"    iifname {_q(t.tap)} {CHADDR} != 0x{t.mac.replace(':', '')} drop\n" for t in taps if t.ip)
        + "    accept\n"
        "  }\n"
        "  chain from_tunnel {\n"
        "    ether type != { ip, arp } drop\n"
        "    ether type ip udp dport { 67, 68 } drop\n"
        "    ether type arp arp saddr ip @gateways drop\n"
        "    ether type ip ip saddr @gateways drop\n"
        "    accept\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        "    iifname @tunnels oifname @usertaps ether saddr != @servicemacs drop\n"
        "    oifname @tunnels ether type ip udp dport { 67, 68 } drop\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        "    oifname @tunnels drop\n"
        "  }\n}\n"
    )
    out.append(f"table inet {table} {{}}\ndelete table inet {table}\n")
    out.append(f"table inet {table} {{\n")
    out.append(_set("bridges", "ifname", (_q(b) for b in bridges)))
    out.append(_set("guarded", "inet_service", (str(p.port) for p in ports)))
    out.append(_set("allowed", "inet_service . uid", (f"{p.port} . {u}" for p in ports for u in p.uids)))
    out.append(_set("vxlanports", "inet_service", (str(t.port) for t in tunnels)))
    out.append(_set("peers", "ipv4_addr", (p for t in tunnels for p in t.peers)))
    out.append(
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        "    udp dport @vxlanports ip saddr != @peers drop\n"
        "    udp dport @vxlanports udp sport >= 1024 drop\n"
        "    udp dport @vxlanports meta nfproto ipv6 drop\n"
        "    iifname @bridges udp dport 67 accept\n"
        "    iifname @bridges drop\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        "    iifname != @bridges oifname @bridges drop\n"
        "    iifname @bridges oifname != @bridges drop\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        '    oif "lo" tcp flags & (syn | ack) == syn tcp dport @guarded jump owner_only\n'
        "    udp dport @vxlanports meta skuid != 0 drop\n"
        "  }\n"
        "  chain owner_only {\n"
        "    meta skuid 0 accept\n"
        "    tcp dport . meta skuid @allowed accept\n"
        "    reject with tcp reset\n"
        "  }\n}\n"
    )
    return "".join(out)


def remove(table: str) -> str:
    return (
        f"table bridge {table} {{}}\ndelete table bridge {table}\ntable inet {table} {{}}\ndelete table inet {table}\n"
    )


def dnsmasq_argv(binary: str, net: Network, pidfile: str, hostsfile: str) -> list[str]:
    """DHCP only (no DNS), on the network's bridge only, and only to the MACs kvmgate
    allocated (`static`: no dynamic pool). No router or DNS server is offered:
    a services network leads nowhere but to its members."""
    assert net.subnet is not None
    return [
        binary,
        "--conf-file=/dev/null",
        "--port=0",
        f"--pid-file={pidfile}",
        f"--interface={net.bridge}",
        "--except-interface=lo",
        "--bind-interfaces",
        f"--dhcp-range={int_to_ip(net.subnet.network)},static,{net.subnet.netmask},12h",
        f"--dhcp-hostsfile={hostsfile}",
        "--dhcp-authoritative",
        "--leasefile-ro",
        "--dhcp-option=3",  # no router
        "--dhcp-option=6",  # no DNS server
        *(["--dhcp-option=26,1450"] if net.vxlan is not None else []),  # the tunnel's MTU (host.network)
        "--user=nobody",
        "--group=nogroup",
    ]


def dhcp_hosts(rows: Iterable[tuple[str, str]]) -> str:
    """dnsmasq's --dhcp-hostsfile: one `MAC,address` line per NIC."""
    return "".join(f"{mac},{ip}\n" for mac, ip in sorted(rows))


def attachments(net: HostNet, settings: Settings, owner_uid: int) -> tuple[Port, ...]:
    """Where each of the VM's NICs plugs in on this host."""
    ports = []
    for n in settings.nics:
        network = net.network(n.network)
        if network.bridged != bool(n.tap):
            raise PolicyError("--network", f"{n.network} changed kind in the policy: re-create the VM's NICs")
        bridge = network.bridge_for(net.ifprefix, owner_uid) if network.bridged else None
        ports.append(Port(n, bridge, network.kind == "services" and not settings.service))
    return tuple(ports)


def services_of(net: HostNet, settings: Settings) -> tuple[str, ...]:
    """The services networks the VM has a NIC on, in its NICs' order."""
    return tuple(
        n.network for n in settings.nics if n.network in net.networks and net.network(n.network).kind == "services"
    )


def redirs(tokens: Sequence[str]) -> list[g.Redir]:
    """The note's `-redir`s among a VM's admin options (already validated canonical tokens)."""
    return [g.parse_redir("-redir", tokens[i + 1], g.Limits()) for i in range(len(tokens) - 1) if tokens[i] == "-redir"]
