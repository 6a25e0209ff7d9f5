"""Who holds a listening TCP port on this host, from /proc/net/tcp{,6}.

Any local user can bind a free loopback port. A forwarded port that QEMU (or
kvmgate-gated) does not hold at this moment may be held by someone else, who
would receive the owner's ssh or VNC connection: `kvmgate ssh` and `kvmgate vnc`
only connect to a port whose listener belongs to the expected uid (the VM's
owner for QEMU, kvmgate-gated for wake ports)."""

from __future__ import annotations

import contextlib
import socket
import sys

LISTEN = "0A"
# /proc/net/tcp local addresses (32-bit words in host order) that take a connection
# to 127.0.0.1: the address itself and the IPv4 wildcard. IPv6 listeners are not
# looked at: /proc cannot say whether one on [::] is v6-only (another user may
# bind one beside QEMU's 127.0.0.1 socket), and one that is dual-stack could not
# have been bound while QEMU listens there (the kernel refuses the overlapping
# bind to another uid, as it refuses 0.0.0.0 and a second 127.0.0.1).


def _proc_hex(family: int, address: str) -> str:
    packed = socket.inet_pton(family, address)
    return "".join(f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))


TAKES_LOOPBACK = {
    "/proc/net/tcp": {_proc_hex(socket.AF_INET, a) for a in ("127.0.0.1", "0.0.0.0")},  # noqa: S104
}


def listener_uids(port: int) -> set[int]:
    """The uids of the sockets that would take a connection to 127.0.0.1:`port`
    (where kvmgate ssh, kvmgate vnc and kvmgate-gated connect)."""
    uids: set[int] = set()
    for table, addresses in TAKES_LOOPBACK.items():
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) <= 7 or fields[3] != LISTEN:
                    continue
                address, _, hexport = fields[1].rpartition(":")
                if int(hexport, 16) == port and address.upper() in addresses:
                    uids.add(int(fields[7]))
    return uids


def held_by(port: int, uid: int) -> bool:
    """Is `port` on 127.0.0.1 listened on, and only by `uid`?"""
    return listener_uids(port) == {uid}
