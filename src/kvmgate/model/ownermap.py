"""The owner map: which owner (and which of their VMs) holds each address on a
services network, as the service VMs that asked for it read it. Pure.

Why an address can stand for an owner: kvmgate hands out every services address
itself (per MAC, by DHCP), and the bridge's rules drop any frame whose MAC, ARP
sender or IPv4 source is not the one kvmgate gave that tap (model.hostnet). So on
a services network "this packet comes from 10.77.0.5" means "from alice's VM a1",
whatever alice does as root in her guest. A service such as an NFS or Samba server
can then hand out each owner's share to that owner's addresses only
(docs/services.md, guest/kvmgate-shares).

The channel is a small read-only disk per service VM (virtio, serial
`kvmgate-ownermap`), which the host rewrites in place and the guest reads with
O_DIRECT. A disk, not a 9p or virtiofs export, because those block QEMU's
migration while mounted (a service VM must still hibernate at `admin shutdown`),
and not a socket, because nothing on the host then has to stay up to serve it.
The file has two slots; the host writes the older one and the guest takes the
valid slot with the higher generation, so a read racing a write never sees half
a map. A second, writable disk (serial `kvmgate-ownerack`) carries the guest's
answer: the generation it has applied.

A freed address is quarantined (decisions: service shares): it is handed out
again only once every live service VM on its network has acknowledged a map
without it, so bob never inherits alice's exports.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from kvmgate.model.identity import NAME_RE, OWNER_RE
from kvmgate.model.regex import Regex

VERSION = 1
SLOT = 1 << 20  # bytes per slot; the file holds two
HEADER = 64  # the slot's header line, then the body
MAP_BYTES = 2 * SLOT
ACK_BYTES = 4096
MAX_ROWS = 8000  # a body of at most ~1 MiB: a map that does not fit is published empty (closed)
_IP = Regex(r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")
_NET = Regex(r"[a-z][a-z0-9]{0,15}")
_ACK = Regex(r"kvmgate-ownermap-ack 1 ([0-9]{20})\n")


class Row(NamedTuple):
    network: str
    ip: str
    owner: str
    name: str

    def line(self) -> str:
        return f"{self.network} {self.ip} {self.owner} {self.name}\n"


def valid(row: Row) -> bool:
    """Each field has the shape the guest also checks, so no value can split a line
    or reach an exports file or smb.conf as anything but a name or an address."""
    return bool(
        _NET.fullmatch(row.network)
        and _IP.fullmatch(row.ip)
        and OWNER_RE.fullmatch(row.owner)
        and NAME_RE.fullmatch(row.name)
        and len(row.name) <= 32
    )


class Quarantined(NamedTuple):
    network: str
    ip: str
    generation: int  # the first map without its old owner


class Fence(NamedTuple):
    """Every free address of a network, held until its servers applied `generation`:
    the record was lost while servers ran, so which addresses they still serve to
    whom is unknown (host.ownermap rebuilds it so)."""

    network: str
    generation: int


class State(NamedTuple):
    """STATE/ownermap.json: the last published map and the freed addresses."""

    generation: int = 0
    rows: tuple[Row, ...] = ()
    quarantine: tuple[Quarantined, ...] = ()
    fence: tuple[Fence, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "generation": self.generation,
                "rows": [list(r) for r in self.rows],
                "quarantine": [list(q) for q in self.quarantine],
                "fence": [list(f) for f in self.fence],
            },
            sort_keys=True,
        )


class BadState(ValueError):
    """STATE/ownermap.json does not parse or has the wrong shapes."""


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 10**20:
        raise BadState("a bad generation")
    return v


def parse_state(text: str | bytes) -> State:
    try:
        data = json.loads(text)
    except ValueError:
        raise BadState("not JSON") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise BadState("unknown version")
    rows, quarantine = data.get("rows"), data.get("quarantine")
    if not isinstance(rows, list) or not isinstance(quarantine, list):
        raise BadState("rows and quarantine must be lists")
    out: list[Row] = []
    for r in rows:
        if not (isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)) or not valid(Row(*r)):
            raise BadState("a bad row")
        out.append(Row(*r))
    q: list[Quarantined] = []
    for e in quarantine:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)):
            raise BadState("a bad quarantine entry")
        if not _NET.fullmatch(e[0]) or not _IP.fullmatch(e[1]):
            raise BadState("a bad quarantine entry")
        q.append(Quarantined(e[0], e[1], _int(e[2])))
    fence = data.get("fence", [])
    if not isinstance(fence, list) or not all(
        isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and _NET.fullmatch(f[0]) for f in fence
    ):
        raise BadState("a bad fence")
    return State(_int(data.get("generation")), tuple(out), tuple(q), tuple(Fence(f[0], _int(f[1])) for f in fence))


def rebuilt(seen: int, clock: int, networks: Iterable[str]) -> State:
    """A record lost while servers ran: a generation above any they have seen (and
    above the clock's, in microseconds, so never one an older record handed out),
    and every free address of each network fenced until they applied the next map."""
    base = max(seen, clock)
    return State(base, fence=tuple(Fence(n, base + 1) for n in sorted(set(networks))))


def publish(old: State, rows: Iterable[Row]) -> State:
    """The next state for the registry's rows now. The generation moves only when
    the map changes; an address whose owner changed or that is gone is quarantined
    from the new generation on (a later change of the same address keeps the
    earlier, stricter entry and adds its own)."""
    new_rows = tuple(sorted(set(r for r in rows if valid(r))))
    if new_rows == old.rows:
        return old
    gen = old.generation + 1
    now = {(r.network, r.ip): r.owner for r in new_rows}
    freed = {Quarantined(r.network, r.ip, gen) for r in old.rows if now.get((r.network, r.ip)) != r.owner}
    return State(gen, new_rows, tuple(sorted(set(old.quarantine) | freed)), old.fence)


def released(state: State, acks: Mapping[str, Sequence[int]]) -> State:
    """Drop the quarantine entries every live service VM on the network has
    acknowledged. `acks`: per network, the generation each live owner-map service
    VM on it has applied (a network with none has an empty list: nothing serves
    the old map, so nothing is held)."""
    keep = tuple(q for q in state.quarantine if any(a < q.generation for a in acks.get(q.network, ())))
    fence = tuple(f for f in state.fence if any(a < f.generation for a in acks.get(f.network, ())))
    return state._replace(quarantine=keep, fence=fence)


def held(
    state: State,
    acks: Mapping[str, Sequence[int]],
    owner: str,
    name: str,
    hosts: Callable[[str], Iterable[str]] = lambda _: (),
) -> set[tuple[str, str]]:
    """Addresses an allocation for owner's VM `name` must not take: every address
    the published map gives another VM (the registry may have let go of it before
    the map did), the quarantined ones not yet released, and every address but the
    VM's own of a network still fenced (`hosts`: a network's addresses)."""
    mine = {(r.network, r.ip) for r in state.rows if (r.owner, r.name) == (owner, name)}
    out = {(r.network, r.ip) for r in state.rows} - mine
    now = released(state, acks)
    out |= {(q.network, q.ip) for q in now.quarantine}
    for f in now.fence:
        out |= {(f.network, ip) for ip in hosts(f.network)} - mine
    return out


def body(rows: Iterable[Row], networks: Iterable[str]) -> bytes:
    """What one service VM reads: the rows of the networks it is on."""
    nets = set(networks)
    lines = [r.line() for r in rows if r.network in nets]
    if len(lines) > MAX_ROWS:
        return b""  # too many to carry: an empty map, so the service gives nobody anything
    return "".join(lines).encode()


def checksum(generation: int, data: bytes) -> int:
    """CRC-32 of the generation, the length and the body: a header torn between two
    writes (a new generation, an old length and checksum) never matches an old body."""
    return zlib.crc32(data, zlib.crc32(f"{generation:020d} {len(data):010d}".encode()))


def header(generation: int, data: bytes) -> bytes:
    h = f"kvmgate-ownermap 1 {generation:020d} {len(data):010d} {checksum(generation, data):08x}\n".encode()
    return h.ljust(HEADER, b"\0")


def slot(generation: int, data: bytes) -> bytes:
    """One slot's bytes: the header, the body, zeros to the slot's end."""
    if HEADER + len(data) > SLOT:
        raise ValueError("owner map too large for its slot")
    return (header(generation, data) + data).ljust(SLOT, b"\0")


def read_slot(raw: bytes) -> tuple[int, bytes] | None:
    """A slot's generation and body if its header and checksum are whole."""
    line = raw[:HEADER].split(b"\n", 1)[0].decode("ascii", "replace").split(" ")
    if len(line) != 5 or line[:2] != ["kvmgate-ownermap", "1"]:
        return None
    try:
        gen, size, crc = int(line[2]), int(line[3]), int(line[4], 16)
    except ValueError:
        return None
    data = raw[HEADER : HEADER + size]
    if len(data) != size or checksum(gen, data) != crc:
        return None
    return gen, data


def older_slot(raw_headers: Sequence[bytes]) -> int:
    """Which slot the next write goes to: an invalid one, else the older one."""
    gens = [read_header_generation(h) for h in raw_headers]
    if gens[0] is None or gens[1] is None:
        return 0 if gens[0] is None else 1
    return 0 if gens[0] <= gens[1] else 1


def read_header_generation(raw: bytes) -> int | None:
    line = raw[:HEADER].split(b"\n", 1)[0].decode("ascii", "replace").split(" ")
    if len(line) != 5 or line[:2] != ["kvmgate-ownermap", "1"] or not line[2].isdigit():
        return None
    return int(line[2])


def ack(generation: int) -> bytes:
    return f"kvmgate-ownermap-ack 1 {generation:020d}\n".encode().ljust(512, b"\0")


def parse_ack(raw: bytes) -> int:
    """The generation a guest says it applied; 0 for anything else (not yet, or garbage)."""
    line = raw[:64].split(b"\n", 1)[0] + b"\n"
    m = _ACK.fullmatch(line.decode("ascii", "replace"))
    return int(m.group(1)) if m else 0
