"""Read the owner's ssh public keys for the cloud-init seed: with the owner's
rights (`caller.as_user`), regular files only, never blocking on a fifo, at
most `limits.keys_max_kib` in all. What is read is parsed by
`model.cloudinit`, which keeps only well-formed public key lines.

Files: `~/.ssh/authorized_keys`, then `~/.ssh/*.pub` (at most MAX_PUB of them,
in name order). A file the owner cannot read (a symlink to a root-only file)
is refused like any other file of theirs kvmgate cannot open; a missing one
is simply not there.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

from kvmgate.errors import FileRefused
from kvmgate.host import caller
from kvmgate.model import cloudinit

MAX_PUB = 16
MAX_ENTRIES = 1024  # names looked at in ~/.ssh


def _read(path: str, shown: str, budget: list[int]) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        raise FileRefused(f"{shown}: cannot open it with your rights") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{shown}: not a regular file")
        data = os.read(fd, budget[0] + 1)
        if len(data) > budget[0]:
            raise FileRefused(f"{shown}: your ssh key files are larger than the policy's limits.keys_max_kib")
        budget[0] -= len(data)
        return data
    finally:
        os.close(fd)


def read(pw: pwd.struct_passwd, max_kib: int) -> tuple[list[cloudinit.Key], list[cloudinit.Skipped]]:
    ssh = os.path.join(pw.pw_dir, ".ssh")
    budget = [max_kib << 10]
    keys: list[cloudinit.Key] = []
    skipped: list[cloudinit.Skipped] = []
    with caller.as_user(pw):
        data = _read(os.path.join(ssh, "authorized_keys"), "~/.ssh/authorized_keys", budget)
        if data is not None:
            k, s = cloudinit.parse_keys(data, "~/.ssh/authorized_keys")
            keys += k
            skipped += s
        try:
            with os.scandir(ssh) as it:
                names = []
                for i, entry in enumerate(it):
                    if i >= MAX_ENTRIES:
                        break
                    if entry.name.endswith(".pub") and entry.name.isascii() and entry.name.isprintable():
                        names.append(entry.name)
        except OSError:
            names = []
        for name in sorted(names)[:MAX_PUB]:
            shown = f"~/.ssh/{name}"
            data = _read(os.path.join(ssh, name), shown, budget)
            if data is not None:
                k, s = cloudinit.parse_keys(data, shown)
                keys += k
                skipped += s
    return cloudinit.unique(keys), skipped
