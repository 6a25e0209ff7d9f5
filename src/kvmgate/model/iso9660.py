"""A tiny ISO 9660 writer with Joliet names, for the cloud-init seed. Pure.

cloud-init's NoCloud source looks for a filesystem labelled `cidata` holding
`meta-data`, `user-data` and `network-config`. Those names are not ISO 9660
level-1 names (lowercase, `-`), so the image carries a Joliet directory as
well, which is what Linux reads (and what `genisoimage -J` writes); the
primary directory has 8.3 stand-ins. One root directory, a few small files:
the layout is fixed, so the writer is short enough to audit, and root never
runs an external tool on data that came from a user (their public keys).
"""

from __future__ import annotations

import struct

SECTOR = 2048
MAX_FILE = 1 << 20  # a seed file; the seed is small by construction


def _both16(n: int) -> bytes:
    return struct.pack("<H", n) + struct.pack(">H", n)


def _both32(n: int) -> bytes:
    return struct.pack("<I", n) + struct.pack(">I", n)


def _dir_record(ident: bytes, extent: int, size: int, is_dir: bool) -> bytes:
    length = 33 + len(ident)
    length += length % 2
    rec = bytearray(length)
    rec[0] = length
    rec[2:10] = _both32(extent)
    rec[10:18] = _both32(size)
    rec[18:25] = bytes([126, 1, 1, 0, 0, 0, 0])  # 2026-01-01 00:00 UTC: a fixed date keeps seeds reproducible
    rec[25] = 2 if is_dir else 0
    rec[28:32] = _both16(1)
    rec[32] = len(ident)
    rec[33 : 33 + len(ident)] = ident
    return bytes(rec)


def _path_table(root_extent: int, big_endian: bool) -> bytes:
    fmt = ">IH" if big_endian else "<IH"
    return bytes([1, 0]) + struct.pack(fmt, root_extent, 1) + b"\0\0"


def _short_name(name: str, taken: set[bytes]) -> bytes:
    """An 8.3 d-character name for the primary directory."""
    stem = "".join(c for c in name.upper() if c.isascii() and (c.isalnum() or c == "_"))[:8] or "FILE"
    for i in range(100):
        cand = (stem if i == 0 else f"{stem[:6]}{i:02d}").encode() + b".;1"
        if cand not in taken:
            taken.add(cand)
            return cand
    raise ValueError("too many files")


def _volume_descriptor(
    kind: int, label: bytes, sectors: int, lpath: int, mpath: int, root: bytes, joliet: bool
) -> bytes:
    vd = bytearray(SECTOR)
    vd[0] = kind
    vd[1:6] = b"CD001"
    vd[6] = 1
    pad = b"\0 " if joliet else b" "
    vd[8:40] = (pad * 32)[:32]  # system identifier: blank
    vd[40:72] = (label + pad * 32)[:32]
    vd[80:88] = _both32(sectors)
    if joliet:
        vd[88:91] = b"%/E"  # UCS-2 level 3
    vd[120:124] = _both16(1)
    vd[124:128] = _both16(1)
    vd[128:132] = _both16(SECTOR)
    vd[132:140] = _both32(10)
    vd[140:144] = struct.pack("<I", lpath)
    vd[148:152] = struct.pack(">I", mpath)
    vd[156:190] = root
    for off, n in ((190, 128), (318, 128), (446, 128), (574, 128), (702, 37), (739, 37), (776, 37)):
        vd[off : off + n] = (pad * n)[:n]
    for off in (813, 830, 847, 864):
        vd[off : off + 17] = b"0" * 16 + b"\0"
    vd[881] = 1
    return bytes(vd)


def image(label: str, files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image with Joliet names holding `files` in its root."""
    if not label.isascii() or not 1 <= len(label) <= 16:
        raise ValueError("label must be 1 to 16 ASCII characters")
    if not 1 <= len(files) <= 16:
        raise ValueError("1 to 16 files")
    names = sorted(files)
    for n in names:
        if not (n.isascii() and n.isprintable() and 1 <= len(n) <= 64) or "/" in n or ";" in n:
            raise ValueError(f"bad file name {n!r}")
        if len(files[n]) > MAX_FILE:
            raise ValueError(f"{n} is too large for a seed")
    # Sectors: 0-15 system area, 16 primary, 17 Joliet, 18 terminator,
    # 19-22 path tables, 23 primary root, 24 Joliet root, then the files.
    extents = {}
    nxt = 25
    for n in names:
        extents[n] = nxt
        nxt += max(1, -(-len(files[n]) // SECTOR))
    total = nxt
    taken: set[bytes] = set()
    short = {n: _short_name(n, taken) for n in names}
    roots = {}
    for joliet, sector in ((False, 23), (True, 24)):
        recs = [_dir_record(b"\0", sector, SECTOR, True), _dir_record(b"\1", sector, SECTOR, True)]
        order = sorted(names, key=lambda n: n.encode("utf-16-be") if joliet else short[n])
        for n in order:
            ident = n.encode("utf-16-be") if joliet else short[n]
            recs.append(_dir_record(ident, extents[n], len(files[n]), False))
        body = b"".join(recs)
        if len(body) > SECTOR:
            raise ValueError("directory larger than one sector")
        roots[joliet] = body.ljust(SECTOR, b"\0")
    out = bytearray(SECTOR * 16)
    out += _volume_descriptor(1, label.encode(), total, 19, 20, _dir_record(b"\0", 23, SECTOR, True), False)
    out += _volume_descriptor(2, label.encode("utf-16-be"), total, 21, 22, _dir_record(b"\0", 24, SECTOR, True), True)
    out += bytes([255]) + b"CD001" + bytes([1]) + bytes(SECTOR - 7)
    for root_sector in (23, 24):
        out += _path_table(root_sector, False).ljust(SECTOR, b"\0")
        out += _path_table(root_sector, True).ljust(SECTOR, b"\0")
    out += roots[False] + roots[True]
    for n in names:
        data = files[n]
        out += data.ljust(max(1, -(-len(data) // SECTOR)) * SECTOR, b"\0")
    assert len(out) == total * SECTOR
    return bytes(out)
