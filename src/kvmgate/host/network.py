"""Networks on the host, root only: allocating ports, MACs, addresses and tap names
to VMs, and building what they need (bridges, taps, the nftables ruleset,
dnsmasq). Pure choices live in `allocate`, the rules' text in `hostnet`.

Every allocation happens under one lock over the whole registry, so concurrent
`admin create`s never hand out the same value; the values live in the VM's
settings and are freed when the VM is deleted. Host set-up is idempotent:
`admin net-up` (the unit file's command) and every start of a bridged VM after a
reboot (the marker lives on the /run tmpfs) rebuild exactly the same state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from kvmgate.errors import KvmgateError, PolicyError
from kvmgate.host import ownermap
from kvmgate.model import allocate, hostnet
from kvmgate.model.policy.network import ForwardRequest, HostNet, Network, int_to_ip, ip_to_int
from kvmgate.model.policy.policy import Policy
from kvmgate.model.settings import Forward, Nic, Settings
from kvmgate.model.translate import Resource
from kvmgate.paths import GATED_USER, Paths
from kvmgate.store import critical, define, display, every, locks, registry, runtime
from kvmgate.store.files import flock, write_atomic

IP = "/usr/sbin/ip"
NFT = "/usr/sbin/nft"
DNSMASQ = "/usr/sbin/dnsmasq"
BRIDGE = "/usr/sbin/bridge"
TUNNEL_MTU = 1450  # 1500 less VXLAN's 50 bytes
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    p = subprocess.run(list(argv), input=stdin, env=_ENV, capture_output=True, text=True, check=False)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise KvmgateError(f"{os.path.basename(argv[0])}: {last}")


NET_WAIT = 120.0  # a stuck holder fails the others with "busy", never hangs them


def _net_lock(paths: Paths) -> contextlib.AbstractContextManager[int]:
    """Serialises changes to the host's bridges, rules and dnsmasq (not allocation)."""
    return flock(os.path.join(paths.run, "net.lock"), NET_WAIT, "the host network")


# ------------------------------------------------------------------------ allocation


def _redir_ports(vm: registry.VM) -> set[int]:
    return {r.host_port for r in hostnet.redirs(vm.identity.tokens)}


def _bindable(bind: str) -> Any:
    """Could QEMU bind this port now? Probed as QEMU's user network binds
    (SO_REUSEADDR): a port whose last connection is in TIME_WAIT is free, one
    that some program listens on is not."""

    def usable(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind, port))
                return True
            except OSError:
                return False

    return usable


def allocate_for(
    paths: Paths,
    net: HostNet,
    vm: registry.VM,
    settings: Settings,
    networks: list[str] | None = None,
    forwards: list[ForwardRequest] | None = None,
    wake: bool | None = None,
    avoid: frozenset[int] = frozenset(),
) -> Settings:
    """New settings for `vm` with ports, MACs, addresses and taps chosen. The caller
    holds the allocation lock until the settings are written. Values the VM already
    has are kept where the request still asks for them."""
    everyone = [(v, s) for v, s in every.all_settings(paths) if v.key != vm.key]
    others = [s for _, s in everyone]
    taken_ports = {f.port for s in others for f in s.forwards} | {p for v, _ in everyone for p in _redir_ports(v)}
    taken_internal = {f.internal for s in others for f in s.forwards if f.internal} | avoid
    taken_ports |= avoid  # held by some other program right now (reclaim_ports)
    taken_macs = {n.mac for s in others for n in s.nics}
    taken_taps = {n.tap for s in others for n in s.nics if n.tap}
    taken_ips = {(n.network, n.ip) for s in others for n in s.nics if n.ip}
    held: list[set[tuple[str, str]]] = []  # still in service VMs' owner maps, or quarantined: asked when needed
    for p in _redir_ports(vm):
        if not net.ports.in_pool(p) or p in taken_ports:
            why = "is already another VM's" if p in taken_ports else "is outside the pool"
            raise PolicyError("-redir", f"host port {p} {why} ({net.ports.pool[0]}-{net.ports.pool[1]})")
    taken_ports |= _redir_ports(vm)
    nics = settings.nics
    if networks is not None:
        old = {n.network: n for n in settings.nics}
        chosen: list[Nic] = []
        for i, name in enumerate(networks):
            network = net.network(name)
            if name in (n.network for n in chosen):
                raise PolicyError("--network", f"{name} given twice")
            keep = old.get(name)
            mac = keep.mac if keep and keep.mac not in taken_macs else allocate.mac(vm.key, i, taken_macs)
            taken_macs.add(mac)
            tap = ip = None
            if network.bridged:
                tap = keep.tap if keep and keep.tap and keep.tap not in taken_taps else None
                tap = tap or allocate.tap(net.ifprefix, taken_taps)
                taken_taps.add(tap)
            if network.subnet is not None:
                mine = keep.ip if keep and keep.ip and (name, keep.ip) not in taken_ips else None
                if not mine and not held:
                    held.append(ownermap.held(paths, net, vm, everyone))
                    taken_ips |= held[0]
                ip = mine or int_to_ip(
                    allocate.first_free(network.subnet.hosts(), {ip_to_int(a) for n, a in taken_ips if n == name})
                )
            chosen.append(Nic(name, mac, tap, ip))
        nics = tuple(chosen)
    waking = settings.wake if wake is None else wake
    requests = forwards
    if requests is None:
        requests = [ForwardRequest(f.service, f.guest, f.port) for f in settings.forwards]
    old_fw = {f.service: f for f in settings.forwards}
    rows = []
    for r in requests:
        if r.port is not None and r.port in taken_ports:
            raise PolicyError("--forward", f"host port {r.port} is already assigned to another VM")
        kept = old_fw.get(r.service)
        port = r.port or (kept.port if kept and kept.port not in taken_ports else None)
        if port is None:
            port = allocate.first_free(
                range(net.ports.pool[0], net.ports.pool[1] + 1), taken_ports, _bindable(net.ports.bind)
            )
        taken_ports.add(port)
        internal = None
        if waking:
            internal = kept.internal if kept and kept.internal and kept.internal not in taken_internal else None
            lo, hi = net.ports.internal
            internal = internal or allocate.first_free(range(lo, hi + 1), taken_internal, _bindable("127.0.0.1"))
            taken_internal.add(internal)
        rows.append(Forward(r.service, r.guest, port, internal))
    if waking and not rows:
        raise PolicyError("--wake", "needs forwarded ports (--forward): kvmgate-gated listens on them")
    return settings.with_(nics=nics, wake=waking, forwards=tuple(rows))


def reclaim_ports(paths: Paths, policy: Policy, vm: registry.VM) -> None:
    """Before QEMU binds the VM's forwarded ports: any that another program holds
    now (a user squatting the pool) gets a new port, under the allocation lock,
    so that a squatter can neither stop the start nor receive its connections.
    Ports kvmgate-gated listens on are gated's and left alone. Says what moved."""
    for line in _reclaim(paths, policy, vm):
        sys.stderr.write(f"kvmgate: {line}\n")


def _reclaim(paths: Paths, policy: Policy, vm: registry.VM) -> list[str]:
    settings = registry.read_settings(vm)
    net = policy.net
    # QEMU binds a wake port's internal end on loopback, and a plain forward itself.
    qemu_binds = [(f.internal, "127.0.0.1") if f.internal else (f.port, net.ports.bind) for f in settings.forwards]
    squatted = frozenset(p for p, bind in qemu_binds if not _bindable(bind)(p))
    if not squatted:
        return []
    with locks.alloc_lock(paths):
        settings = registry.read_settings(vm)
        requests = [
            ForwardRequest(f.service, f.guest, None if f.port in squatted else f.port) for f in settings.forwards
        ]
        new = allocate_for(paths, net, vm, settings, forwards=requests, avoid=squatted)
        define.write_settings(vm, new)
    sync(paths, policy)
    before = {f.service: f for f in settings.forwards}
    return [
        f"{f.service}: port {old} is held by another program; the VM now uses port {now}"
        for f in new.forwards
        for old, now in ((before[f.service].port, f.port), (before[f.service].internal, f.internal))
        if old != now and old is not None
    ]


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _local_addresses() -> set[str]:
    """This node's IPv4 addresses (in this process's network namespace)."""
    p = subprocess.run([IP, "-4", "-o", "addr", "show"], env=_ENV, capture_output=True, text=True, check=False)
    return {w[3].split("/")[0] for w in (line.split() for line in p.stdout.splitlines()) if len(w) > 3}


def tunnels(net: HostNet) -> list[tuple[Network, hostnet.Tunnel, str]]:
    """The services networks that span the cluster's VM nodes, as seen from this
    node: (network, its tunnel, this node's own address). None on a host whose
    addresses are not among the peers (a login node runs no VMs)."""
    spanning = [n for n in net.networks.values() if n.kind == "services" and n.vxlan is not None]
    if not spanning:
        return []
    mine = _local_addresses()
    out = []
    for n in spanning:
        here = [p for p in n.peers if p in mine]
        dev = n.tunnel(net.ifprefix)
        if here and dev is not None and n.subnet is not None:
            others = tuple(p for p in n.peers if p != here[0])
            out.append((n, hostnet.Tunnel(dev, n.vxlan_port, others, n.subnet.gateway), here[0]))
    return out


def ensure_tunnel(network: Network, tunnel: hostnet.Tunnel, local: str) -> None:
    """The VXLAN device on the network's bridge: static flooding to every other node
    (no multicast, no learning from the underlay), an MTU that leaves room for the
    encapsulation, a non-isolated port (user VMs reach service VMs through it; the
    bridge rules keep them from each other)."""
    if not _exists(tunnel.dev):
        _run([IP, "link", "add", tunnel.dev, "type", "vxlan", "id", str(network.vxlan), "dstport", str(tunnel.port),
              "srcport", str(tunnel.port), str(tunnel.port + 1), "local", local, "nolearning"])  # fmt: skip
    fdb = subprocess.run([BRIDGE, "fdb", "show", "dev", tunnel.dev], env=_ENV, capture_output=True, text=True)
    flooded = {w[2] for w in (ln.split() for ln in fdb.stdout.splitlines()) if w[:2] == ["00:00:00:00:00:00", "dst"]}
    for peer in flooded - set(tunnel.peers):  # a node the policy no longer lists hears nothing more
        _run([BRIDGE, "fdb", "del", "00:00:00:00:00:00", "dev", tunnel.dev, "dst", peer])
    for peer in set(tunnel.peers) - flooded:
        _run([BRIDGE, "fdb", "append", "00:00:00:00:00:00", "dev", tunnel.dev, "dst", peer])
    _run([IP, "-batch", "-"], f"link set dev {tunnel.dev} mtu {TUNNEL_MTU}\n"
         f"link set dev {tunnel.dev} master {network.bridge}\nlink set dev {tunnel.dev} up\n")  # fmt: skip


def _rules(
    net: HostNet, everything: list[tuple[registry.VM, Settings]], extra: tuple[tuple[int, int], ...] = ()
) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    bridges = {n.bridge for n in net.networks.values() if n.kind == "services"}
    taps: list[hostnet.TapRule] = []
    ports: list[hostnet.PortRule] = []
    dhcp: dict[str, list[tuple[str, str]]] = {n.name: [] for n in net.networks.values() if n.kind == "services"}
    gated = _uid(GATED_USER)
    ports.extend(hostnet.PortRule(port, (uid,)) for port, uid in extra if net.ports.protect)
    for vm, s in everything:
        uid = _uid(vm.identity.owner)
        if uid is None:
            continue
        for n in s.nics:
            network = net.networks.get(n.network)
            if network is None or not n.tap:
                continue
            bridges.add(network.bridge_for(net.ifprefix, uid))
            services = network.kind == "services"
            taps.append(hostnet.TapRule(n.tap, n.mac, n.ip, services and not s.service, services and s.service))
            if n.ip and n.network in dhcp:
                dhcp[n.network].append((n.mac, n.ip))
        if not net.ports.protect:
            continue
        for f in s.forwards:
            ports.append(hostnet.PortRule(f.port, (uid,)))  # the owner connects (to QEMU, or to gated)
            if f.internal and gated is not None:
                ports.append(hostnet.PortRule(f.internal, (gated,)))  # only gated reaches QEMU's end
        ports.extend(
            hostnet.PortRule(r.host_port, (uid,)) for r in hostnet.redirs(vm.identity.tokens) if r.proto == "tcp"
        )
        vnc = _vnc_port(vm)
        if vnc:
            ports.append(hostnet.PortRule(vnc, (uid,)))
    spanning = [t for _, t, _ in tunnels(net)]
    return hostnet.ruleset(net.nft_table, sorted(bridges), taps, ports, spanning), dhcp


def _vnc_port(vm: registry.VM) -> int | None:
    """A running VM's loopback VNC port (vnc.mode = tcp), recorded at its start."""
    vnc = display.read_display(vm).get("vnc")
    port = vnc.get("port") if isinstance(vnc, dict) else None
    return port if isinstance(port, int) and runtime.is_running(vm) else None


def netrun(paths: Paths) -> str:
    """dnsmasq's files: it re-reads its hosts file as `nobody`, so not under RUN (0700)."""
    return paths.run + "-net"


def sync(paths: Paths, policy: Policy, extra: tuple[tuple[int, int], ...] = ()) -> None:
    """Load the ruleset and dnsmasq's hosts files from the registry (idempotent).
    extra: (port, uid) rules for a VM that is starting and not yet running (its
    TCP VNC port, guarded before QEMU listens on it)."""
    with _net_lock(paths):
        _sync(paths, policy, extra)


def _sync(paths: Paths, policy: Policy, extra: tuple[tuple[int, int], ...] = ()) -> None:
    everything = every.all_settings(paths)
    text, dhcp = _rules(policy.net, everything, extra)
    _run([NFT, "-f", "-"], text)
    d = netrun(paths)
    os.makedirs(d, 0o755, exist_ok=True)
    os.chmod(d, 0o755)  # the helper's umask is 077
    for name, rows in dhcp.items():
        path = os.path.join(d, f"{name}.hosts")
        text = hostnet.dhcp_hosts(rows)
        try:
            with open(path) as f:
                before = set(f.read().splitlines())
        except FileNotFoundError:
            before = set()
        gid = _nogroup()  # every services VM's MAC and address: dnsmasq's group only
        write_atomic(path, text, 0o640 if gid else 0o644)
        os.chown(path, 0, gid)
        pid = _dnsmasq_pid(paths, name)
        if not pid:
            continue
        if before - set(text.splitlines()):
            # An address was freed: dnsmasq would keep it leased to the old MAC for the
            # lease time and refuse it to the next VM. Its leases live only in memory
            # (--leasefile-ro), so a restart forgets them.
            _stop(pid)
            critical.pause("net:dnsmasq-stopped")  # tests: a signal here must not leave it stopped
            _start_dnsmasq(paths, policy.net.networks[name])
        else:
            os.kill(pid, signal.SIGHUP)  # re-reads the hosts file
    if ownermap.in_use(paths, everything):
        # Last: should it fail, the old record still gives a freed address to its old owner,
        # so no allocation can take it (host.ownermap.held) until a later sync publishes.
        ownermap.publish(paths, policy.net, everything)


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}/cmdline"):
            return
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.02)


def _start_dnsmasq(paths: Paths, network: Network) -> None:
    if _exists(network.bridge):  # else net-up starts it with the bridge
        hosts = os.path.join(netrun(paths), f"{network.name}.hosts")
        _run(hostnet.dnsmasq_argv(DNSMASQ, network, _pidfile(paths, network.name), hosts))


def _nogroup() -> int:
    """The group dnsmasq runs as (`--group=nogroup`): it re-reads the hosts file after
    dropping root, and no user is a member."""
    import grp

    try:
        return grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return 0


def _dnsmasq_pid(paths: Paths, name: str) -> int | None:
    """The pid dnsmasq wrote, if that process is the dnsmasq kvmgate started with this
    very pid file: dnsmasq writes it as `nobody`, so a subverted dnsmasq must not be
    able to point root's signals at some other process."""
    pidfile = _pidfile(paths, name)
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or "0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    if pid > 1 and argv[0] == DNSMASQ.encode() and f"--pid-file={pidfile}".encode() in argv:
        return pid
    return None


def _pidfile(paths: Paths, name: str) -> str:
    """One dnsmasq per network and network namespace (tests build networks in their own)."""
    return os.path.join(netrun(paths), f"{name}.{_netns()}.pid")


def _exists(ifname: str) -> bool:
    """In this process's network namespace (/proc/self/net follows it; /sys shows the
    namespace it was mounted in, which a Slurm node's namespace may not have remounted)."""
    with open("/proc/self/net/dev") as f:
        return any(line.split(":", 1)[0].strip() == ifname for line in f.readlines()[2:])


def _write(path: str, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(value)


def ensure_bridge(name: str, network: Network | None) -> None:
    """A kvmgate bridge: no IPv6 (no link-local address for guests to reach the host
    by), no IPv4 routing of what arrives on it, the host's DHCP address on services."""
    if not _exists(name):
        with contextlib.suppress(KvmgateError):
            _run([IP, "link", "add", name, "type", "bridge"])
        if not _exists(name):
            raise KvmgateError(f"cannot create bridge {name}")
    _write(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    _write(f"/proc/sys/net/ipv4/conf/{name}/forwarding", "0")
    cmds = []
    if network is not None and network.subnet is not None:
        cmds.append(f"address replace {network.subnet.gateway}/{network.subnet.prefix} dev {name}")
    cmds.append(f"link set dev {name} up")
    _run([IP, "-batch", "-"], "\n".join(cmds) + "\n")


def _marker(paths: Paths) -> str:
    return os.path.join(paths.run, "net.up")


def _netns() -> str:
    return str(os.stat("/proc/self/ns/net").st_ino)


def up(paths: Paths, policy: Policy) -> list[str]:
    """Bring every services network up and load the rules. Returns what it did."""
    done = []
    with _net_lock(paths):
        for network in policy.net.networks.values():
            if network.kind != "services":
                continue
            ensure_bridge(network.bridge, network)
            done.append(f"bridge {network.bridge} {network.subnet}")
        _sync(paths, policy)  # the tunnels' rules are in place before the tunnels
        for network, tunnel, local in tunnels(policy.net):
            ensure_tunnel(network, tunnel, local)
            done.append(f"vxlan {tunnel.dev} (id {network.vxlan}) from {local} to {', '.join(tunnel.peers)}")
        done.append(f"nftables tables {policy.net.nft_table}")
        for network in policy.net.networks.values():
            if network.kind == "services" and _dnsmasq_pid(paths, network.name) is None:
                _start_dnsmasq(paths, network)
                done.append(f"dnsmasq on {network.bridge}")
        with open(_marker(paths), "w") as f:
            f.write(_netns())
    return done


def ensure_up(paths: Paths, policy: Policy) -> None:
    """Cheap when nothing is to do: after a reboot /run is empty and this rebuilds."""
    try:
        with open(_marker(paths)) as f:
            if f.read() == _netns():
                return
    except FileNotFoundError:
        pass
    up(paths, policy)


def down(paths: Paths, policy: Policy) -> list[str]:
    """Stop dnsmasq, remove the rules and every kvmgate bridge that has no ports left."""
    done = []
    with _net_lock(paths):
        for network in policy.net.networks.values():
            pid = _dnsmasq_pid(paths, network.name)
            if pid:
                _stop(pid)
                done.append(f"stopped dnsmasq on {network.bridge}")
        with contextlib.suppress(KvmgateError):
            _run([NFT, "-f", "-"], hostnet.remove(policy.net.nft_table))
            done.append(f"removed nftables tables {policy.net.nft_table}")
        for _, tunnel, _ in tunnels(policy.net):
            if _exists(tunnel.dev):
                _run([IP, "link", "del", tunnel.dev])
                done.append(f"removed vxlan {tunnel.dev}")
        names = {n.bridge for n in policy.net.networks.values() if n.kind == "services"}
        names |= {i for i in os.listdir("/sys/class/net") if i.startswith(policy.net.ifprefix + "p")}
        for name in sorted(names):
            brif = f"/sys/class/net/{name}/brif"  # only bridges, and only empty ones
            if os.path.isdir(brif) and not os.listdir(brif):
                _run([IP, "link", "del", name])
                done.append(f"removed bridge {name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_marker(paths))
    return done


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(ifname: str) -> int:
    """The tap's descriptor, opened by root on /dev/net/tun (QEMU never can)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def attach_taps(paths: Paths, policy: Policy, resources: Sequence[Resource]) -> None:
    """Put freshly opened taps on their bridges, isolated ports set before the link
    is up, so no frame ever crosses a non-isolated port."""
    if any(r.kind == "ownermap" for r in resources):  # a service VM's owner map (host.ownermap)
        with _net_lock(paths):
            ownermap.prepare(paths, policy.net, resources, every.all_settings(paths))
    if policy.backend.slurm:
        # A cluster node: VMs were made and deleted on a login node since, so its rules,
        # DHCP hosts and tunnels here catch up now, before a tap comes up (docs/cluster.md).
        with _net_lock(paths):
            _sync(paths, policy)
            for network, tunnel, local in tunnels(policy.net):
                if _exists(network.bridge):
                    ensure_tunnel(network, tunnel, local)
    taps = [r for r in resources if r.kind == "tap" and r.bridge]
    if not taps:
        return
    services = {n.bridge for n in policy.net.networks.values() if n.kind == "services"}
    if any(r.bridge in services and not _exists(r.bridge) for r in taps):
        up(paths, policy)  # a services network added to the policy since the last net-up
    with _net_lock(paths):
        cmds = []
        for r in taps:
            assert r.bridge is not None
            if not _exists(r.bridge):
                ensure_bridge(r.bridge, None)  # a private network's first VM since boot
            cmds.append(f"link set dev {r.path} master {r.bridge}")
            cmds.append(f"link set dev {r.path} type bridge_slave isolated {'on' if r.isolated else 'off'}")
            cmds.append(f"link set dev {r.path} up")
        _run([IP, "-batch", "-"], "\n".join(cmds) + "\n")
