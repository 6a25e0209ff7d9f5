"""The directories a VM's user-mode network serves (-tftp, -smb): QEMU reads them
itself, as the owner, so a start checks them with the owner's own rights.
Imported only for VMs that have such a directory."""

from __future__ import annotations

import os
import pwd

from kvmgate.errors import FileRefused
from kvmgate.host import caller
from kvmgate.host.blobs import readable_by_qemu
from kvmgate.model.translate import Plan

SMBD = "/usr/sbin/smbd"


def check_dirs(plan: Plan, pw: pwd.struct_passwd, qemu_gid: int) -> None:
    """-tftp and -smb directories are read by QEMU's user network itself, as the
    owner: refuse at start, with the owner's own rights, what it could not read
    (instead of a guest that silently sees nothing)."""
    for option, path in plan.dirs:
        try:
            with caller.as_user(pw):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise FileRefused(
                f"{option}: cannot open the directory {path}: no such directory, or not permitted"
            ) from None
        try:
            st = os.fstat(fd)
            if not readable_by_qemu(st, pw.pw_uid, qemu_gid) or not st.st_mode & 0o111:
                raise FileRefused(f"{option}: {path} is not readable by the VM's owner without groups")
        finally:
            os.close(fd)
        if option == "-smb" and not os.access(SMBD, os.X_OK):
            raise FileRefused("-smb: needs smbd (Debian package samba), which QEMU starts for the guest")
