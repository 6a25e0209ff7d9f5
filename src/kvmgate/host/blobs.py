"""Files QEMU re-opens by /proc/self/fd/N: kernels, initrds, ROMs, and the
-append config. Loaded only by a start that has one of them.

A kernel, initrd or ROM is opened with the owner's rights (host.launch) and
passed as is when QEMU's own credentials (owner uid, kvmgate-qemu gid, no
supplementary groups) can read it. A file the owner reads only through a
supplementary group is copied into a sealed memfd instead. Copies come out of
the start's budget (limits.blobs_max_mib), checked before copying: a repeated
-option-rom cannot multiply the memory root fills for one start.
"""

from __future__ import annotations

import fcntl
import os
import stat

from kvmgate.errors import FileRefused

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def readable_by_qemu(st: os.stat_result, uid: int, qemu_gid: int) -> bool:
    """Would QEMU (owner uid, kvmgate-qemu gid, no groups) pass the kernel's
    permission check when it re-opens this file through /proc/self/fd?"""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == qemu_gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def for_qemu(src: int, path: str, uid: int, qemu_gid: int, budget: list[int]) -> int:
    """`src` itself, or a sealed copy of it (then `src` is closed); `budget` is the
    bytes left for this start's copies."""
    st = os.fstat(src)
    if readable_by_qemu(st, uid, qemu_gid):
        return src
    try:
        if st.st_size > budget[0]:
            raise FileRefused(
                f"{path}: the files copied for QEMU (kernels, initrds, ROMs it could not read itself) "
                "would exceed this host's limit for one start"
            )
        budget[0] -= st.st_size
        mfd = os.memfd_create("kvmgate-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        off = 0
        while off < st.st_size:
            n = os.sendfile(mfd, src, off, st.st_size - off)
            if n == 0:
                break
            off += n
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
        return mfd
    finally:
        os.close(src)


def sealed(name: str, data: bytes) -> int:
    """A read-only memfd holding `data`, which QEMU opens by /proc/self/fd/N."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd
