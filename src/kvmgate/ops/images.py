"""Operations on a VM's disk that involve the image library, shared by verbs.

`flatten`: `admin delete --keep-disks` of a VM made from a library image. Its
overlay and the image become one standalone qcow2 (qemu-img as the owner, with
descriptors only: `host.imports`), so what is kept needs nothing from the
library, and the image can be removed afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil

from kvmgate.errors import FileRefused
from kvmgate.host import imports
from kvmgate.model import images as model
from kvmgate.paths import Paths
from kvmgate.store import config, registry
from kvmgate.store import images as library


def flatten(paths: Paths, vm: registry.VM, image_id: str) -> None:
    """`admin delete --keep-disks` of a VM made from a library image: its
    overlay and the image become one standalone qcow2 (qemu-img as the owner),
    so what is kept needs nothing from the library. Under the VM's lock."""
    from kvmgate.host import launch
    from kvmgate.host.library import open_base
    from kvmgate.model import qcow2
    from kvmgate.model.translate import Resource
    from kvmgate.store.define import replace_disk

    policy = config.load(paths)
    pw = pwd.getpwnam(vm.identity.owner)
    fd = launch.open_as(pw, vm.default_disk, False, registry.DEFAULT_DISK)
    fds = [fd]
    stage = vm.sub(f".flatten-{os.getpid()}")
    try:
        try:
            info = qcow2.inspect(os.pread(fd, qcow2.HEADER_READ, 0), model.backing_name(image_id))
        except FileRefused as err:
            raise FileRefused(f"cannot keep a standalone copy of {registry.DEFAULT_DISK}: {err}") from None
        src = imports.Source(fd, vm.default_disk, "qcow2", info.virtual_size, os.fstat(fd))
        base = open_base(Resource("base", -1, path=library.data_path(library.library(paths), image_id)))
        fds.append(base)
        imports.need_space(vm.vmdir, src.allocated + os.fstat(base).st_blocks * 512, registry.DEFAULT_DISK)
        registry.mkdir_root(stage, 0o700)
        staged = os.path.join(stage, registry.DEFAULT_DISK)
        worker = imports.Worker(pw.pw_uid, pw.pw_gid)
        fds.append(imports.convert_to(src, staged, worker, policy.limits, f"{vm.identity.name}: flattening", base))
        replace_disk(vm, staged)
    finally:
        for f in fds:
            os.close(f)
        shutil.rmtree(stage, ignore_errors=True)
