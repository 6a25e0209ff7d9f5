"""Who holds a listening TCP port on this host, from /proc/net/tcp{,6}.

Any local user can bind a free loopback port. A forwarded port that QEMU (or
kvmgate-gated) does not hold at this moment may be held by someone else, who
would receive the owner's ssh or VNC connection: `kvmgate ssh` and `kvmgate vnc`
only connect to a port whose listener belongs to the expected uid (the VM's
owner for QEMU, kvmgate-gated for wake ports)."""

from __future__ import annotations

import contextlib

LISTEN = "0A"


def listener_uids(port: int) -> set[int]:
    """The uids of the sockets listening on `port` (any address)."""
    uids: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    uids.add(int(fields[7]))
    return uids


def held_by(port: int, uid: int) -> bool:
    """Is `port` listened on, and only by `uid`?"""
    return listener_uids(port) == {uid}
