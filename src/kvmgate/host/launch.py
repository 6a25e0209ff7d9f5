"""Open what QEMU needs, then start it with nothing else.

Each resource is opened here, before the fork, in one of three ways:
- disks, kernels, ROMs: with the VM owner's rights (`as_user`), regular files
  only, qcow2 headers checked; kernels and ROMs are copied into sealed memfds;
- sockets, logs, the lock: created by root in root-only directories;
- taps: opened by root on /dev/net/tun, which QEMU can never open itself.
The child then joins the cgroup, installs exactly these fds, drops to the
owner's uid with the dedicated QEMU group, sets NoNewPrivs and execs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import resource
import signal
import socket
import stat
import sys
from typing import NamedTuple

from kvmgate import paths
from kvmgate.errors import FileRefused, Qcow2Refused
from kvmgate.host import caller, cgroup
from kvmgate.model import images, qcow2
from kvmgate.model.policy.grammar import Limits
from kvmgate.model.translate import Plan, Resource

QEMU_GROUP = paths.QEMU_GROUP


class Where(NamedTuple):
    rundir: str
    logdir: str
    tmpdir: str


def open_as(pw: pwd.struct_passwd, path: str, writable: bool, what: str) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        with caller.as_user(pw):
            fd = os.open(path, flags)
    except OSError as err:
        if err.errno in (
            errno.ENOENT,
            errno.EACCES,
            errno.EPERM,
            errno.ELOOP,
            errno.ENOTDIR,
            errno.EROFS,
            errno.ENAMETOOLONG,
            errno.EISDIR,
            errno.ENXIO,
            errno.ETXTBSY,
        ):
            raise FileRefused(f"{what}: cannot open {path}: no such file, or not permitted") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileRefused(f"{what}: {path} is not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _disk(pw: pwd.struct_passwd, r: Resource, limits: Limits) -> tuple[int, int]:
    """Returns (fd, virtual size). The size comes from the user's header (qcow2)
    or file (raw) and sizes what root and QEMU do for the disk (the -snapshot
    overlay, the guest's disk): it is checked against the policy before anything
    is built for it."""
    assert r.path is not None
    fd = open_as(pw, r.path, r.writable, f"-{r.of}")
    try:
        head = os.pread(fd, qcow2.HEADER_READ, 0)
        if r.fmt == "qcow2":
            try:
                size = qcow2.inspect(head, r.backing).virtual_size
            except Qcow2Refused as err:
                raise FileRefused(f"{r.path}: {err}{qcow2.hint(err)}") from None
        elif head.startswith(qcow2.MAGIC):  # the name says raw: never guessed, never passed as raw
            raise FileRefused(f"{r.path}: a qcow2 image whose name says raw: rename it to end in .qcow2")
        else:
            size = max(512, -(-os.fstat(fd).st_size // 512) * 512)
        images.refuse_above(size, limits.image_max_gib, r.path)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _listener(path: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)  # umask 077: the socket is root-only
    s.listen(1)
    return s.detach()


def open_user_resources(
    plan: Plan, pw: pwd.struct_passwd, qemu_gid: int, where: Where, limits: Limits
) -> dict[int, int]:
    """Everything a start can be refused over, opened before anything is changed:
    disks, overlays and blobs with the owner's rights, taps. Maps QEMU fd -> fd.
    Every size the user's files choose is checked against `limits` first."""
    opened: dict[int, int] = {}
    disks: dict[str, tuple[Resource, int]] = {}
    budget = [limits.blobs_max_mib << 20]
    try:
        for r in plan.resources:
            if r.kind == "disk":
                opened[r.fd], size = _disk(pw, r, limits)
                disks[r.of or ""] = (r, size)
            elif r.kind in ("base", "seed"):
                from kvmgate.host import library  # library images and cloud-init seeds

                opened[r.fd] = library.open_base(r) if r.kind == "base" else library.seed(r, pw, limits, where.logdir)
            elif r.kind == "overlay":
                from kvmgate.host import overlay  # -snapshot only

                disk, size = disks[r.of or ""]
                opened[r.fd] = overlay.create(pw, where.tmpdir, size, disk)
            elif r.kind == "blob":
                from kvmgate.host import blobs  # kernels, initrds, ROMs

                src = open_as(pw, r.path or "", False, f"-{r.of}")
                opened[r.fd] = blobs.for_qemu(src, r.path or "", pw.pw_uid, qemu_gid, budget)
            elif r.kind == "tap":
                from kvmgate.host import network  # bridged NICs

                opened[r.fd] = network.open_tap(r.path or "")
            elif r.kind == "config":
                from kvmgate.host import blobs  # -append

                opened[r.fd] = blobs.sealed("kvmgate-config", (r.text or "").encode())
    except BaseException:
        close_all(opened)
        raise
    return opened


def open_runtime_resources(plan: Plan, where: Where, lock_fd: int) -> dict[int, int]:
    """The root-made part, under the VM's lock: sockets, the console log, the lock."""
    opened: dict[int, int] = {}
    try:
        for r in plan.resources:
            if r.kind in SOCKETS:
                opened[r.fd] = _listener(os.path.join(where.rundir, SOCKETS[r.kind]))
            elif r.kind == "console-log":
                # QEMU writes into a pipe; the pump (kvmgate.pump) keeps the file bounded.
                opened[PUMP_READ], opened[r.fd] = os.pipe2(os.O_CLOEXEC)
                opened[PUMP_LOG] = _console_log(where.logdir, plan.restore)
            elif r.kind == "lock":
                opened[r.fd] = os.dup(lock_fd)
            elif r.kind in ("ownermap", "ownerack"):  # root's, made by host.ownermap.prepare
                opened[r.fd] = os.open(r.path or "", (os.O_RDWR if r.writable else os.O_RDONLY) | os.O_NOFOLLOW)
    except BaseException:
        close_all(opened)
        raise
    return opened


SOCKETS = {"qmp": "qmp.sock", "console": "console.sock", "agent": "qga.sock"}  # root-only, in RUN/<key>/
PUMP_READ, PUMP_LOG = -2, -3  # keys of the pump's descriptors among a start's (QEMU's are >= 0)


def _console_log(logdir: str, restore: bool) -> int:
    """This run's console log. A start moves the last run's aside (console.prev.log),
    so that why a VM died can still be read; a restore continues the run's own."""
    path = os.path.join(logdir, "console.log")
    if not restore:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, os.path.join(logdir, "console.prev.log"))
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


def close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def qemu_env(tmpdir: str) -> dict[str, str]:
    """The complete environment QEMU gets; nothing is inherited."""
    return {"PATH": "/usr/bin:/bin", "TMPDIR": tmpdir, "HOME": tmpdir, "LC_ALL": "C"}


def spawn(
    qemu: str,
    plan: Plan,
    fds: dict[int, int],
    pw: pwd.struct_passwd,
    qemu_gid: int,
    where: Where,
    placement: cgroup.Placement,
    qemu_log: int,
    max_files: int,
    max_file_size: int,
    pump: tuple[int, int, int] | None = None,
) -> int:
    """Fork; the child becomes QEMU. Returns QEMU's pid. pump: (pipe's read end,
    console log, its bound in bytes) for the console pump the child starts.

    The parent moves the child into its cgroup while the child prepares (a cgroup
    v1 attach takes milliseconds); the child execs only after the parent says the
    move is done, so QEMU never runs outside its memory limit.
    """
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(qemu, plan, fds, pw, qemu_gid, where, qemu_log, (max_files, max_file_size), go_r, go_w, pump)
    os.close(go_r)
    try:
        placement.place(pid)
        os.write(go_w, b"1")
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(go_w)
    return pid


def _child(
    qemu: str,
    plan: Plan,
    fds: dict[int, int],
    pw: pwd.struct_passwd,
    qemu_gid: int,
    where: Where,
    qemu_log: int,
    rlimits: tuple[int, int],
    go_r: int,
    go_w: int,
    pump: tuple[int, int, int] | None,
) -> None:
    try:
        os.close(go_w)
        os.setsid()
        max_files, max_file_size = rlimits
        for lim, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, max_files)):
            resource.setrlimit(lim, (value, value))
        # Past RLIMIT_FSIZE a write fails with EFBIG (an I/O error for the guest)
        # instead of killing QEMU; the disposition survives exec. The helper's own
        # ignored and blocked signals do not reach QEMU.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Install exactly the planned fds: move every source above the target range
        # first, so no dup2 clobbers a source that is still to be moved.
        devnull = os.open("/dev/null", os.O_RDONLY)
        top = max([*fds, 2]) + 1
        high = top + 64
        staged = {t: fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, high) for t, s in fds.items()}
        log = fcntl.fcntl(qemu_log, fcntl.F_DUPFD_CLOEXEC, high)
        dn = fcntl.fcntl(devnull, fcntl.F_DUPFD_CLOEXEC, high)
        go = fcntl.fcntl(go_r, fcntl.F_DUPFD_CLOEXEC, high)
        kept = [go]
        if pump is not None:
            pump = (
                fcntl.fcntl(pump[0], fcntl.F_DUPFD_CLOEXEC, high),
                fcntl.fcntl(pump[1], fcntl.F_DUPFD_CLOEXEC, high),
                pump[2],
            )
            kept += pump[:2]
        os.dup2(dn, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for target, src in staged.items():
            os.dup2(src, target, inheritable=True)
        keep = set(fds) | {0, 1, 2}
        for fd in range(3, top):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        low = top
        for fd in sorted(kept):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        caller.drop_to(pw.pw_uid, qemu_gid)
        _clear_dir(where.tmpdir)
        os.chdir("/")
        if os.read(go, 1) != b"1":  # the parent failed to place us in the cgroup
            os._exit(126)
        os.close(go)
        if pump is not None:
            _start_pump(*pump)  # before QEMU's file size limit: the console log has its own bound
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
        os.execve(qemu, [qemu, *plan.argv], qemu_env(where.tmpdir))
    except BaseException as err:  # noqa: BLE001 - the child must never return into the helper
        try:
            os.write(2, f"kvmgate: cannot start QEMU: {err}\n".encode())
        finally:
            os._exit(127)


PUMP = "import sys; sys.path.insert(0, {lib!r}); from kvmgate.pump import main; sys.exit(main(sys.argv[1:]))"


def _start_pump(read: int, log: int, limit: int) -> None:
    """Fork the console pump: already the owner, in the VM's cgroup, no
    capabilities. It gets the pipe on 0 and the log on 3, nothing else."""
    if os.fork():
        os.close(read)
        os.close(log)
        return
    try:
        os.dup2(read, 0)
        os.dup2(log, 3)
        os.closerange(4, 1 << 20)
        lib = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        python = sys.executable or "/usr/bin/python3"
        os.execve(python, [python, "-I", "-S", "-c", PUMP.format(lib=lib), str(limit)], {"PATH": "/usr/bin:/bin"})
    finally:
        os._exit(127)


def _clear_dir(path: str) -> None:
    """Empty QEMU's TMPDIR, as the owner (after the privilege drop)."""
    entries = os.listdir(path)
    if not entries:
        return
    import shutil

    for entry in entries:
        p = os.path.join(path, entry)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
