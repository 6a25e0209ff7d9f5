"""Just enough qcow2 to refuse dangerous images and to make empty ones, without qemu-img.

The helper reads an image's header through the descriptor it opened with the
user's rights and refuses backing files, external data files and encryption:
those would make QEMU open further files the wrapper never checked. Empty
images (the admin's default disk, -snapshot overlays) are written here so that
no external tool runs on the privileged path. Pure functions over bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmgate.errors import Qcow2Refused

MAGIC = b"QFI\xfb"
HEADER_READ = 64 * 1024  # the header and its extensions must lie in the first cluster we read
_EXT_END = 0
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_KNOWN = (1 << 5) - 1  # dirty, corrupt, data file, compression type, extended L2


class Qcow2Info(NamedTuple):
    version: int
    virtual_size: int
    cluster_bits: int
    backing: str | None = None  # the backing file name in the header (only ever an expected one)


def is_qcow2(head: bytes) -> bool:
    return head[:4] == MAGIC


def hint(err: Qcow2Refused) -> str:
    """What to do about a refusal the user can fix with the field's own tools."""
    text = str(err)
    if text == "not a qcow2 image":
        return " (its name says qcow2: a raw image must not end in .qcow2)"
    if "backing file" in text:
        return " (make a standalone copy: qemu-img convert -O qcow2 IMAGE NEW.qcow2)"
    return ""


def inspect(head: bytes, backing: str | None = None) -> Qcow2Info:
    """Check a qcow2 header (the file's first HEADER_READ bytes).

    `backing`: the one backing file name this image may carry (a VM's overlay of
    its library image, `model.images.backing_name`). The name is only compared,
    never followed: kvmgate hands QEMU the backing image itself."""
    if len(head) < 72 or not is_qcow2(head):
        raise Qcow2Refused("not a qcow2 image")
    (version, backing_off, backing_len, cluster_bits, size, crypt) = struct.unpack_from(">IQIIQI", head, 4)
    if version not in (2, 3):
        raise Qcow2Refused(f"unsupported qcow2 version {version}")
    named = None
    if backing_off or backing_len:
        if backing is None:
            raise Qcow2Refused("image has a backing file")
        if not 0 < backing_len <= 1023 or backing_off + backing_len > len(head):
            raise Qcow2Refused("bad backing file name")
        named = head[backing_off : backing_off + backing_len].decode("ascii", "replace")
    if named != backing:
        raise Qcow2Refused(
            "its backing file is not this VM's library image" if named else "not an overlay of this VM's library image"
        )
    if crypt:
        raise Qcow2Refused("encrypted images are not supported")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2Refused("bad cluster size")
    ext_start = 72
    if version == 3:
        if len(head) < 104:
            raise Qcow2Refused("truncated header")
        (incompat,) = struct.unpack_from(">Q", head, 72)
        (header_len,) = struct.unpack_from(">I", head, 100)
        if incompat & _INCOMPAT_DATA_FILE:
            raise Qcow2Refused("image has an external data file")
        if incompat & ~_INCOMPAT_KNOWN:
            raise Qcow2Refused("image uses unknown incompatible features")
        if not 104 <= header_len <= len(head):
            raise Qcow2Refused("bad header length")
        ext_start = header_len
    off = ext_start
    while True:
        if off + 8 > len(head):
            raise Qcow2Refused("header extensions run past the first cluster")
        etype, elen = struct.unpack_from(">II", head, off)
        if etype == _EXT_END:
            break
        if etype == _EXT_DATA_FILE:
            raise Qcow2Refused("image names an external data file")
        off += 8 + ((elen + 7) & ~7)
    return Qcow2Info(version, size, cluster_bits, named)


class EmptyImage(NamedTuple):
    """An empty image as its non-zero head plus its full length: the L1 table
    after the head is all zeros, so a writer extends the file (sparse) instead of
    holding it. Memory stays at three clusters whatever size a header claimed."""

    head: bytes
    length: int


_EXT_BACKING_FORMAT = 0xE2792ACA


def empty_image(virtual_size: int, cluster_bits: int = 16, backing: str | None = None) -> EmptyImage:
    """A valid, empty qcow2 v3 image of `virtual_size` bytes.

    Layout, one cluster each: header, refcount table, refcount block, then the
    L1 table (zeros). QEMU grows everything else on demand. `backing`: the name
    an overlay carries for its backing image (format qcow2), written after the
    header extensions; kvmgate never lets anything follow it.
    """
    if virtual_size <= 0 or virtual_size % 512:
        raise ValueError("virtual size must be a positive multiple of 512")
    cs = 1 << cluster_bits
    l1_entries = -(-virtual_size // (cs * (cs // 8)))
    l1_clusters = max(1, -(-l1_entries * 8 // cs))
    clusters = 3 + l1_clusters
    if clusters > cs // 2:  # one 16-bit refcount block must cover the metadata
        raise ValueError("virtual size too large for a single refcount block")
    img = bytearray(3 * cs)
    struct.pack_into(
        ">4sIQIIQIIQQIIQQQQII",
        img,
        0,
        MAGIC,
        3,
        0,
        0,
        cluster_bits,
        virtual_size,
        0,
        l1_entries,
        3 * cs,
        1 * cs,
        1,
        0,
        0,
        0,
        0,
        0,
        4,
        104,
    )
    if backing is not None:
        name = backing.encode("ascii")
        if not 0 < len(name) <= 255:
            raise ValueError("backing name must be 1 to 255 ASCII bytes")
        fmt = b"qcow2"
        struct.pack_into(">II", img, 104, _EXT_BACKING_FORMAT, len(fmt))
        img[112 : 112 + len(fmt)] = fmt
        name_off = 112 + 8 + 8  # the extension padded to 8 bytes, then the end-of-extensions marker
        img[name_off : name_off + len(name)] = name
        struct.pack_into(">QI", img, 8, name_off, len(name))
    struct.pack_into(">Q", img, cs, 2 * cs)
    for i in range(clusters):
        struct.pack_into(">H", img, 2 * cs + 2 * i, 1)
    return EmptyImage(bytes(img), clusters * cs)
