"""The owner map on the host (model.ownermap has the format and the rules):
published to STATE/ownermap.json whenever the registry's networks change (under
the network lock, from host.network's sync), written into each live service VM's
map disk, and read back through the guests' answers for the quarantine of freed
addresses. Loaded only on hosts that use it: a service VM with --owner-map on,
or a published map left from one.

Files: RUN/<key>/ownermap (root 0600, two slots, rewritten in place; QEMU has a
read-only descriptor) and RUN/<key>/ownerack (root 0600, 4 KiB; QEMU has a
writable descriptor and cannot grow it: a raw disk has a fixed size). Root
opens both without following links and reads at most the header of either.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvmgate.errors import KvmgateError
from kvmgate.model import hostnet
from kvmgate.model import ownermap as om
from kvmgate.model.policy.network import HostNet, int_to_ip
from kvmgate.model.settings import Settings
from kvmgate.model.translate import Resource
from kvmgate.paths import Paths
from kvmgate.store import registry, runtime
from kvmgate.store.files import taken, write_atomic

MAP, ACK = "ownermap", "ownerack"
Everything = Sequence[tuple[registry.VM, Settings]]


def _state_path(paths: Paths) -> str:
    return os.path.join(paths.state, "ownermap.json")


def in_use(paths: Paths, everything: Everything) -> bool:
    return os.path.exists(_state_path(paths)) or any(s.owner_map for _, s in everything)


def _load(paths: Paths) -> om.State | None:
    """The published record; State() if there is none; None if it is damaged."""
    try:
        with open(_state_path(paths), "rb") as f:
            return om.parse_state(f.read(1 << 24))
    except FileNotFoundError:
        return om.State()
    except om.BadState:
        return None


def load(paths: Paths) -> om.State:
    state = _load(paths)
    if state is None:
        raise KvmgateError(f"{_state_path(paths)} is damaged: kvmgate admin net-up rebuilds it")
    return state


def _services(net: HostNet) -> list[str]:
    return sorted(n.name for n in net.networks.values() if n.kind == "services")


def rows(net: HostNet, everything: Everything) -> list[om.Row]:
    services = set(_services(net))
    return [
        om.Row(n.network, n.ip, vm.identity.owner, vm.identity.name)
        for vm, s in everything
        for n in s.nics
        if n.ip and n.network in services
    ]


def _read_head(path: str, size: int, offset: int = 0) -> bytes:
    """At most `size` bytes of root's file in RUN/<key>/, never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, offset) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)


def read_ack(rundir: str) -> int:
    """The generation the guest says it applied (0: none yet, or nothing readable)."""
    return om.parse_ack(_read_head(os.path.join(rundir, ACK), 64))


class Server(NamedTuple):
    rundir: str
    name: str  # OWNER/NAME, or the runtime directory's key when the registry no longer resolves it
    networks: tuple[str, ...]
    live: bool
    applied: int


def servers(paths: Paths, net: HostNet, everything: Everything) -> list[Server]:
    """Every service VM with --owner-map on, whether it is live (running, frozen or
    hibernated), and what it applied. A running one the registry cannot resolve
    (a damaged settings file, say) is still found by its runtime directory, and
    counts on every services network: it may still serve an old map."""
    out, seen = [], set()
    for vm, s in everything:
        if s.service and s.owner_map:
            live = runtime.is_running(vm) or registry.read_saved(vm) is not None
            name = f"{vm.identity.owner}/{vm.identity.name}"
            out.append(Server(vm.rundir, name, hostnet.services_of(net, s), live, read_ack(vm.rundir) if live else 0))
            seen.add(vm.rundir)
    try:
        keys = os.listdir(paths.run)
    except FileNotFoundError:
        keys = []
    for key in keys:
        d = os.path.join(paths.run, key)
        if d not in seen and os.path.exists(os.path.join(d, ACK)) and taken(os.path.join(d, "lock"), shared=True):
            out.append(Server(d, key, tuple(_services(net)), True, read_ack(d)))
    return out


def acks(paths: Paths, net: HostNet, everything: Everything, generation: int) -> dict[str, list[int]]:
    """Per services network: the generation each live owner-map service VM on it
    applied. An answer beyond the published generation cannot be true: it counts
    as none (a guest cannot release the quarantine by writing a large number)."""
    out: dict[str, list[int]] = {name: [] for name in _services(net)}
    for srv in servers(paths, net, everything):
        for n in srv.networks:
            if srv.live and n in out:
                out[n].append(srv.applied if srv.applied <= generation else 0)
    return out


def _hosts(net: HostNet) -> Callable[[str], list[str]]:
    def hosts(name: str) -> list[str]:
        subnet = net.networks[name].subnet if name in net.networks else None
        return [] if subnet is None else [int_to_ip(a) for a in subnet.hosts()]

    return hosts


def held(paths: Paths, net: HostNet, vm: registry.VM, everything: Everything) -> set[tuple[str, str]]:
    """Addresses an allocation for `vm` must not take (model.ownermap.held)."""
    if not in_use(paths, everything):
        return set()
    state = load(paths)
    return om.held(
        state, acks(paths, net, everything, state.generation), vm.identity.owner, vm.identity.name, _hosts(net)
    )


def _seen(srv: Server) -> int:
    """The highest generation a server may have seen: its answer, its map's slots."""
    path = os.path.join(srv.rundir, MAP)
    heads = [_read_head(path, om.HEADER, i * om.SLOT) for i in (0, 1)]
    return max([srv.applied] + [om.read_header_generation(h) or 0 for h in heads])


def publish(paths: Paths, net: HostNet, everything: Everything) -> om.State:
    """The registry's map now, published and written to every running owner-map
    VM's disk. Called with the network lock held. A record that is damaged, or
    gone while servers are live, is rebuilt so that no generation goes back and no
    free address of their networks is handed out before they applied the new map."""
    old = recorded = _load(paths)
    live = [srv for srv in servers(paths, net, everything) if srv.live]
    if old is None or (old == om.State() and live):
        old = om.rebuilt(max([_seen(srv) for srv in live] + [0]), time.time_ns() // 1000, _services(net))
        sys.stderr.write("kvmgate: the owner map's record was rebuilt: free services addresses are held back "
                         "until every running server has applied the new map\n")  # fmt: skip
    new = om.publish(old, rows(net, everything))
    new = om.released(new, acks(paths, net, everything, new.generation))
    if new != recorded or not os.path.exists(_state_path(paths)):
        write_atomic(_state_path(paths), new.to_json())
    for vm, s in everything:
        if s.service and s.owner_map:
            try:
                _write_map(os.path.join(vm.rundir, MAP), new, hostnet.services_of(net, s))
            except OSError as err:  # one server's file: the others and the network sync go on
                sys.stderr.write(f"kvmgate: {vm.identity.owner}/{vm.identity.name}: owner map not written: {err}\n")
    return new


def _write_map(path: str, state: om.State, networks: Sequence[str], fresh: bool = False) -> None:
    """Write the map into the slot the guest is not reading (the older one). A
    fresh file (a start) is made whole first; an existing one is only rewritten."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if fresh else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if fresh:
            raise
        return  # not running: its next start writes it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        if fresh:
            os.ftruncate(fd, om.MAP_BYTES)
        heads = [os.pread(fd, om.HEADER, 0), os.pread(fd, om.HEADER, om.SLOT)]
        if not fresh and max((om.read_header_generation(h) or 0) for h in heads) == state.generation:
            return  # the guest has this one already
        os.pwrite(fd, om.slot(state.generation, om.body(state.rows, networks)), om.older_slot(heads) * om.SLOT)
    finally:
        os.close(fd)


def prepare(paths: Paths, net: HostNet, resources: Sequence[Resource], everything: Everything) -> None:
    """A service VM's start or restore: the map published now in a fresh map disk,
    and an empty answer disk (the guest answers again once it has read the map).
    Called with the network lock held, so no later publish can be overtaken."""
    state = publish(paths, net, everything)
    for r in resources:
        if r.kind in ("ownermap", "ownerack"):
            registry.mkdir_root(os.path.dirname(r.path or ""), 0o700)  # RUN/<key>/, before the liveness lock makes it
        if r.kind == "ownermap":
            _write_map(r.path or "", state, (r.text or "").split(), fresh=True)
        elif r.kind == "ownerack":
            fd = os.open(r.path or "", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, om.ACK_BYTES)
            finally:
                os.close(fd)


def report(paths: Paths, net: HostNet, everything: Everything) -> dict[str, object]:
    """`admin owner-map`: the published map, the quarantine and each server's answer."""
    state = load(paths)
    now = om.released(state, acks(paths, net, everything, state.generation))
    return {
        "generation": state.generation,
        "rows": [r._asdict() for r in state.rows],
        "quarantine": [q._asdict() for q in now.quarantine],
        "fenced": [f._asdict() for f in now.fence],
        "servers": [
            {"server": srv.name, "live": srv.live, "applied": srv.applied, "networks": list(srv.networks)}
            for srv in servers(paths, net, everything)
        ],
    }
