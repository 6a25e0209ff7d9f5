"""Who is asking, and acting with exactly their rights.

The caller is taken from what the kernel and sudo vouch for: the real uid, or
SUDO_UID when the real uid is root (sudo sets it and resets the rest of the
environment). Nothing else the caller controls is consulted.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import signal
from collections.abc import Iterator
from typing import NamedTuple

from kvmgate.errors import PermissionRefused
from kvmgate.store import critical

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST = 63


class Caller(NamedTuple):
    uid: int
    name: str
    via_sudo: bool

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def is_admin(self) -> bool:
        """root itself, not one of kvmgate's own actors (the PAM worker, gated, the
        memory budget), which run as root but act for a user: quotas never refuse
        the admin, and always hold for those."""
        return self.uid == 0 and self.name == "root"


def identify(environ: dict[str, str]) -> Caller:
    if os.geteuid() != 0:
        raise PermissionRefused("kvmgate-helper must run as root (users reach it through sudo)")
    ruid = os.getuid()
    sudo_uid = environ.get("SUDO_UID")
    if ruid == 0 and sudo_uid is not None:
        if not sudo_uid.isdigit() or len(sudo_uid) > 10:
            raise PermissionRefused("malformed SUDO_UID")
        uid, via = int(sudo_uid), True
    else:
        uid, via = ruid, False
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        raise PermissionRefused(f"uid {uid} has no user entry") from None
    return Caller(uid, name, via)


def scrub(keep: int | None = None) -> None:
    """Close inherited fds, clear the environment and reset what the caller could
    have preset (umask, cwd, rlimits, supplementary groups). `keep`: one
    descriptor root itself handed over (the PAM hook's spool lock)."""
    for low, high in ((3, 1 << 20),) if keep is None else ((3, keep), (keep + 1, 1 << 20)):
        os.closerange(low, high)
    # The helper shares the caller's terminal (sudoers: !use_pty). Ctrl-Z, or a background
    # job with `stty tostop`, must never stop root while it holds a lock others wait for.
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    critical.install()  # every other signal sudo relays waits while a lock is held
    os.environ.clear()
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    os.umask(0o077)
    os.chdir("/")
    # A complete, known profile: the caller's limits (a tiny RLIMIT_FSIZE that would
    # truncate a state file, a low RLIMIT_NOFILE, ...) never reach root's code or QEMU.
    inf = resource.RLIM_INFINITY
    for lim, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, inf),
        (resource.RLIMIT_DATA, inf),
        (resource.RLIMIT_AS, inf),
        (resource.RLIMIT_CPU, inf),
        (resource.RLIMIT_NPROC, inf),
        (resource.RLIMIT_NOFILE, 65536),
        (resource.RLIMIT_STACK, 8 << 20),
        (resource.RLIMIT_MEMLOCK, 8 << 20),
        (resource.RLIMIT_MSGQUEUE, 819200),
        (resource.RLIMIT_SIGPENDING, 65536),
    ):
        try:
            resource.setrlimit(lim, (value, value))
        except (ValueError, OSError):
            # Root without CAP_SYS_RESOURCE (some containers) cannot raise a hard
            # limit: take the highest soft limit allowed, and refuse outright the
            # limits that would make root's own writes or QEMU fail half-way.
            hard = resource.getrlimit(lim)[1]
            if lim == resource.RLIMIT_FSIZE or (lim == resource.RLIMIT_NOFILE and hard != inf and hard < 1024):
                raise PermissionRefused("refusing to run under the caller's lowered hard resource limits") from None
            resource.setrlimit(lim, (value if hard == inf or (value != inf and value <= hard) else hard, hard))
    os.setgroups([])


@contextlib.contextmanager
def as_user(pw: pwd.struct_passwd) -> Iterator[None]:
    """Open files with the user's uid, gid and groups, not root's: whatever the
    user cannot open, the wrapper cannot be tricked into opening for them."""
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    os.setgroups(groups)
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups([])


def drop_to(uid: int, gid: int) -> None:
    """Irrevocably become uid/gid with no groups, no capabilities (bounding set
    emptied too), NoNewPrivs."""
    import ctypes  # only the child that becomes QEMU pays for it

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_LAST + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last cap: fine
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionRefused("failed to drop privileges")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PermissionRefused("failed to set NoNewPrivs")
