"""What an owner's VMs hold, measured on the host, never taken from a record a
user could have influenced: the VM count from the registry, memory from each
VM's options through the policy (as a start would give it), disk from the files
in each VM's `disks/` (virtual sizes from their headers, real bytes from the
blocks the filesystem allocated, subdirectories included: the owner can write
there), ports from the settings root wrote. Admin-made VMs count too.

Measuring reads the owner's directory as root without following a link:
`lstat` for sizes, and a header read only from a regular file that is still the
same inode when opened (O_NOFOLLOW, O_NONBLOCK). The walk is bounded."""

from __future__ import annotations

import contextlib
import os
import stat
import struct

from kvmgate.errors import KvmgateError, PolicyError
from kvmgate.host.caller import Caller
from kvmgate.model import qcow2
from kvmgate.model import selfservice as ss
from kvmgate.model.policy.policy import Policy
from kvmgate.model.translate import Plan
from kvmgate.ops.plan import plan_for
from kvmgate.paths import Paths
from kvmgate.store import every, jobs, live, registry

MAX_ENTRIES = 4096  # files and directories looked at in one VM's disks/
MAX_OPEN = 64  # directories open at once while measuring it


def _virtual(dirfd: int, name: str, st: os.stat_result) -> int:
    if not name.endswith(".qcow2"):
        return st.st_size
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return st.st_size
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return st.st_size
        head = os.pread(fd, 32, 0)
    finally:
        os.close(fd)
    if len(head) == 32 and head[:4] == qcow2.MAGIC:
        return int(struct.unpack_from(">Q", head, 24)[0])
    return st.st_size


class _Unmeasurable(PolicyError):
    def __init__(self, path: str) -> None:
        super().__init__(
            "disk",
            f"{path} holds more than {MAX_ENTRIES} files, or directories nested wider than {MAX_OPEN}: "
            "kvmgate cannot measure your disk use; remove what your VMs do not need",
        )


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def disk_use(vm: registry.VM) -> tuple[int, int]:
    """(virtual bytes of the disk images, real bytes of everything) in the VM's
    owner-writable directories: disks/, and tmp/ (QEMU's, emptied at each start,
    but the owner's to write while the VM is stopped)."""
    virtual, real = tree_use(vm.sub("disks"), True)
    return virtual, real + tree_use(vm.sub("tmp"), False)[1]


def tree_use(path: str, images: bool) -> tuple[int, int]:
    """(virtual bytes of the images at its top, if `images`; real bytes of everything) under `path`.
    Every directory is opened relative to its parent without following a link,
    so a directory the owner swaps for a link to somewhere else is not entered:
    the totals never tell the owner about files they cannot see. A tree too big
    to measure within the bounds is a refusal (it is never counted as less)."""
    virtual = real = seen = 0
    try:
        top = os.open(path, _DIR)
    except OSError:
        return 0, 0
    stack = [(top, images)]
    try:
        while stack:
            fd, is_top = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    names = []
                    for e in entries:
                        seen += 1
                        if seen > MAX_ENTRIES:
                            raise _Unmeasurable(path)
                        names.append(e.name)
                for n in names:
                    try:
                        st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    real += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        if len(stack) >= MAX_OPEN:
                            raise _Unmeasurable(path)
                        with contextlib.suppress(OSError):
                            stack.append((os.open(n, _DIR, dir_fd=fd), False))
                    elif stat.S_ISREG(st.st_mode) and is_top:
                        virtual += _virtual(fd, n, st)
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return virtual, real


def memory_of(policy: Policy, vm: registry.VM, options: list[str] | None = None) -> int:
    """The guest RAM (MiB) the VM has with these user options (None: its running
    options, or none)."""
    if options is None:
        options = []
        with contextlib.suppress(KvmgateError):
            options = live.read_options(vm)
    try:
        return plan_for(vm, policy, options, "tcg").memory_mib
    except KvmgateError:
        return plan_for(vm, policy, [], "tcg").memory_mib


def use_of(paths: Paths, policy: Policy, owner: str) -> ss.Use:
    total = ss.Use()
    for vm in every.each_vm(paths, owner):
        try:
            settings = registry.read_settings(vm)
            defined = memory_of(policy, vm, [])
            running = memory_of(policy, vm) if jobs.running(vm) else 0
        except KvmgateError:
            settings, defined, running = None, 0, 0
        virtual, real = disk_use(vm)
        ports = len(settings.forwards) if settings else 0
        total = total.plus(ss.Use(1, defined, running, virtual, real, ports))
    kept = tree_use(os.path.join(paths.state, "kept", owner), False)[1]  # delete --keep-disks
    return total._replace(disk_real=total.disk_real + kept)


def disk_left(paths: Paths, policy: Policy, vm: registry.VM, who: Caller) -> int | None:
    """The owner's real bytes left under their disk quota (None: no quota). A
    start gives each of its writable disks this much room to grow (RLIMIT_FSIZE).
    An owner already over their quota is refused the start; root never is (for
    root's starts the bound still applies, where it can be measured)."""
    from kvmgate.store import selfservice

    grant = selfservice.grant_of(selfservice.load(paths, policy), vm.identity.owner)
    if grant is None or grant.disk_bytes is None:
        return None
    limit = grant.disk_bytes
    try:
        use = use_of(paths, policy, vm.identity.owner)
    except KvmgateError:
        if who.is_admin:
            return None
        raise
    if not who.is_admin and (use.disk_virtual > limit or use.disk_real > limit):
        raise PolicyError(
            "disk",
            f"over your disk quota: your VMs hold {_gib(use.disk_virtual)} (virtual) and {_gib(use.disk_real)} "
            f"(real) of {_gib(limit)}: free space or delete a VM first (kvmgate quota)",
        )
    return max(0, limit - use.disk_real)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


SPARSE_SLACK = 64 << 20  # a disk file may be this much larger than what it holds


def size_limit(plan: Plan, fds: dict[int, int], left: int, limit: int, vm: registry.VM) -> int:
    """Under a disk quota each writable disk may grow by the owner's remaining
    bytes (`disk_left`), within `limit` (-1: none); a write past it pauses the VM
    (werror=stop). A hibernate writes through a pipe, not bounded by it. A file
    size limit cannot bound writes into a file's holes, so a disk in the VM's
    directory that is far larger than what it holds (an owner's `truncate`) is
    refused; at least 1 MiB, for QEMU's log."""
    sizes = []
    for r in plan.resources:
        if r.kind != "disk" or not r.writable or r.fd not in fds:
            continue
        st = os.fstat(fds[r.fd])
        if r.path and r.path.startswith(vm.sub("disks") + "/") and st.st_size - st.st_blocks * 512 > SPARSE_SLACK:
            raise PolicyError(
                "disk",
                f"{os.path.basename(r.path)} is a {_gib(st.st_size)} file holding {_gib(st.st_blocks * 512)}: "
                "a sparse disk cannot be bounded by your disk quota (qemu-img convert it to a compact qcow2)",
            )
        sizes.append(st.st_size)
    bound = max(max(sizes, default=0) + left, 1 << 20)
    return bound if limit < 0 else min(limit, bound)
