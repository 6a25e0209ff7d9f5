"""The one way an image file comes in (`admin image add`, `admin import`) and the
one way an overlay is flattened (`admin delete --keep-disks`).

Root opens the admin's file (never through a symlink; regular files only),
checks its header against the format its name or `--format` gives
(`model.images`), and then hands descriptors to `qemu-img`, which runs as an
account that owns the result and nothing else: `kvmgate-image` for the
library, the VM's owner for a VM's disk. qemu-img parses the image; root never
does more than read a header. It sees the files only as `/proc/self/fd/N`, the
source as `json:` with `"backing": null`, so no name inside an image is ever
followed with root's rights. Its time, file size, memory and CPU are bounded,
and the result is checked with `qemu-img check` before anything publishes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import time
from typing import NamedTuple

from kvmgate.errors import FileRefused, KvmgateError, WrongState
from kvmgate.model import images, qcow2
from kvmgate.model.policy.grammar import Limits

QEMU_IMG = "/usr/bin/qemu-img"
AS_LIMIT = 4 << 30  # qemu-img's address space: far above what a convert needs
_ERR_KEEP = 4096


class Source(NamedTuple):
    fd: int
    path: str
    fmt: str
    virtual_size: int
    st: os.stat_result

    @property
    def allocated(self) -> int:
        return self.st.st_blocks * 512


class Worker(NamedTuple):
    """Whom qemu-img runs as: uid and gid, no other groups."""

    uid: int
    gid: int

    def can_read(self, st: os.stat_result) -> bool:
        mode = st.st_mode
        if st.st_uid == self.uid:
            return bool(mode & stat.S_IRUSR)
        if st.st_gid == self.gid:
            return bool(mode & stat.S_IRGRP)
        return bool(mode & stat.S_IROTH)


def open_source(path: str, given_format: str | None, limits: Limits) -> Source:
    """Open the admin's file (root's rights: the admin named it) and check it."""
    fmt = images.format_for(path, given_format)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FileRefused(f"{path}: is a symbolic link: name the file itself") from None
        raise FileRefused(f"{path}: cannot open: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path}: not a regular file (a fifo, a device or a directory)")
        os.set_blocking(fd, True)
        size = images.check_header(os.pread(fd, qcow2.HEADER_READ, 0), fmt, st.st_size, path)
        images.refuse_above(size, limits.image_max_gib, path)
    except BaseException:
        os.close(fd)
        raise
    return Source(fd, path, fmt, size, st)


def need_space(directory: str, needed: int, what: str) -> None:
    """Refuse before starting rather than fill the state filesystem half-way."""
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    if free < needed + (64 << 20):
        raise FileRefused(
            f"{what}: not enough free space in {directory} "
            f"({needed / (1 << 30):.1f} GiB needed, {free / (1 << 30):.1f} GiB free)"
        )


def stage_copy(src: Source, dest: str, progress: str) -> Source:
    """A root-made, world-readable copy of a source the worker cannot read
    (inside a root-only directory), with its header checked again: the original
    may change under us, the copy cannot."""
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        total, done, shown = src.st.st_size, 0, -1
        while done < total:
            n = os.copy_file_range(src.fd, out, min(64 << 20, total - done), done, done)
            if n == 0:
                break
            done += n
            shown = _show(progress, "copying", done * 100 // max(total, 1), shown)
        os.fchmod(out, 0o444)
        st = os.fstat(out)
        size = images.check_header(os.pread(out, qcow2.HEADER_READ, 0), src.fmt, st.st_size, src.path)
        if size != src.virtual_size:
            raise FileRefused(f"{src.path}: changed while it was being copied")
    except BaseException:
        os.close(out)
        raise
    return Source(out, src.path, src.fmt, size, st)


def _spec(fmt: str, fd: int, backing: object = None) -> str:
    node: dict[str, object] = {"driver": fmt, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
    if fmt == "qcow2":
        node["backing"] = backing
    return "json:" + json.dumps(node, sort_keys=True, separators=(",", ":"))


def convert(
    src: Source,
    out_fd: int,
    worker: Worker,
    limits: Limits,
    progress: str = "",
    base_fd: int | None = None,
) -> None:
    """qemu-img convert SOURCE -> qcow2 into `out_fd` (a file the worker may
    write), then qemu-img check of the result. `base_fd`: the source is a
    library overlay and this its backing image (flattening)."""
    fds = [src.fd, out_fd]
    backing: object = None
    if base_fd is not None:
        fds.append(base_fd)
        backing = json.loads(_spec("qcow2", base_fd)[5:])
    argv = [QEMU_IMG, "convert", "-p", "-O", "qcow2", _spec(src.fmt, src.fd, backing), f"/proc/self/fd/{out_fd}"]
    # Bound the output: the image's data plus qcow2's own tables, never more.
    fsize = src.virtual_size + src.virtual_size // 64 + (64 << 20)
    _run(argv, fds, worker, limits, fsize, progress, "converting")
    if check(out_fd, worker, limits).virtual_size < src.virtual_size:
        raise KvmgateError(f"{src.path}: the converted image is smaller than the source")


def convert_to(
    src: Source, dest: str, worker: Worker, limits: Limits, progress: str = "", base_fd: int | None = None
) -> int:
    """`convert` into a new file `dest` (in a root-only stage) that the worker owns
    while it writes; synced. Returns its descriptor, the caller's to close."""
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(out, worker.uid, worker.gid)
        convert(src, out, worker, limits, progress, base_fd)
        os.fsync(out)
    except BaseException:
        os.close(out)
        raise
    return out


def check(fd: int, worker: Worker, limits: Limits) -> qcow2.Qcow2Info:
    """`qemu-img check` of a qcow2 the worker may read, and its header: standalone."""
    _run([QEMU_IMG, "check", "-q", _spec("qcow2", fd)], [fd], worker, limits, 0, "", "")
    return qcow2.inspect(os.pread(fd, qcow2.HEADER_READ, 0))


def _run(
    argv: list[str], fds: list[int], worker: Worker, limits: Limits, fsize: int, progress: str, doing: str
) -> None:
    """qemu-img with exactly `fds` (as /proc/self/fd/N in its argv), as `worker`,
    bounded; its progress shown on a terminal, its last error line kept."""
    deadline = time.monotonic() + limits.import_max_minutes * 60
    timeout = limits.import_max_minutes * 60

    def child() -> None:  # after fork, before exec: bound, then drop for good
        for lim, value in (
            (resource.RLIMIT_AS, AS_LIMIT),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_CPU, timeout + 60),
            *(((resource.RLIMIT_FSIZE, fsize),) if fsize else ()),
        ):
            resource.setrlimit(lim, (value, value))
        from kvmgate.host import caller

        caller.drop_to(worker.uid, worker.gid)

    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=tuple(fds),
        preexec_fn=child,
        start_new_session=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        close_fds=True,
    )
    err = b""
    shown = -1
    try:
        assert proc.stdout is not None and proc.stderr is not None
        streams = [proc.stdout, proc.stderr]
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WrongState(f"{doing or 'checking'} took longer than limits.import_max_minutes; stopped")
            ready, _, _ = select.select(streams, [], [], min(left, 1.0))
            for s in ready:
                chunk = os.read(s.fileno(), 65536)
                if not chunk:
                    streams.remove(s)
                elif s is proc.stderr:
                    err = (err + chunk)[-_ERR_KEEP:]
                elif progress:
                    pct = images.progress(chunk)
                    if pct is not None:
                        shown = _show(progress, doing, pct, shown)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if shown >= 0:
            sys.stderr.write("\n")
    if code != 0:
        lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        why = lines[-1].removeprefix("qemu-img: ") if lines else f"exit status {code}"
        if code < 0 and -code == signal.SIGXFSZ:
            why = "the result grew past the image's size bound"
        raise KvmgateError(f"qemu-img {argv[1]} failed: {why[:300]}")


def _show(what: str, doing: str, pct: int, shown: int) -> int:
    """Progress on a terminal only, a line rewritten in place."""
    if what and pct != shown and os.isatty(2):
        sys.stderr.write(f"\r{what}: {doing} {pct}%")
        sys.stderr.flush()
        return pct
    return shown
