"""kvmgate-gated: wake on connect, the note's "user logs on via ssh (or http)
into a running VM instance" without ever touching the host.

An unprivileged asyncio daemon (account `kvmgate-gated`). For every port the
admin forwards for a VM that wakes on connect (`kvmgate admin set NAME --owner U
--forward ssh --wake on`) it listens on the pool's address (loopback by
default); a connection to a frozen or hibernated VM first wakes it (through the
helper, via sudo), then is forwarded to the loopback port QEMU
forwards to the guest. While connections are open the owner counts as logged
on (a session record that dies with this process); after the admin's idle time
without connections or host sessions, the VM is frozen per its policy. One
VM's trouble never drops another's listener; SIGHUP reloads the table.

One owner can never shut others out: connections are limited per VM
(PER_VM) and per owner (PER_OWNER), and in total to what the descriptor limit
allows (each connection holds two descriptors); past a limit a connection is
closed at once. gated raises its own descriptor limit to the hard limit
whatever its unit says, and its log goes through `logging`, rate-limited per
message (LOG_BURST per LOG_WINDOW seconds, then one summary), so a flood
cannot turn into a flood of tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import resource
import signal
import sys
import time
from typing import Any

from kvmgate.host import sockets
from kvmgate.paths import installed

CONNECT_TIMEOUT = 60.0
RELOAD_AFTER = 3.0
PER_VM = 64  # connections held open to one VM
PER_OWNER = 128  # ... and to all VMs of one owner
USED_EVERY = 60.0  # seconds: a VM in use is reported used at most this often
PER_PEER = 16  # ... and from one client address to one VM (a public bind address: anyone may connect)
RESERVED_FDS = 64  # listeners, helper calls' pipes, logging
LOG_BURST = 10
LOG_WINDOW = 60.0

log = logging.getLogger("kvmgate-gated")


class RateLimit(logging.Filter):
    """At most LOG_BURST records per message per LOG_WINDOW; then one line that
    says how many were dropped when the window ends."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:80]
        now = time.monotonic()
        start, count = self.seen.get(key, (now, 0))
        if now - start > LOG_WINDOW:
            if count > LOG_BURST:
                record.msg = f"{record.msg} (and {count - LOG_BURST} more like it in {LOG_WINDOW:.0f} s)"
            start, count = now, 0
        if len(self.seen) > 1000:  # bounded: forget the oldest keys
            self.seen.clear()
        self.seen[key] = (start, count + 1)
        return count < LOG_BURST


def descriptor_budget() -> int:
    """Raise the soft limit to the hard one; return how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return max(1, (soft - RESERVED_FDS) // 2)


class Gate:
    def __init__(self, helper: list[str], budget: int = 1 << 20) -> None:
        self.helper = helper
        self.budget = budget
        self.total = 0
        self.owners: dict[str, int] = {}
        self.peers: dict[tuple[str, str], int] = {}
        self.servers: dict[int, asyncio.Server] = {}
        self.conns: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.used: dict[str, float] = {}  # when each VM was last reported used
        self.table: dict[int, dict[str, Any]] = {}

    async def call(self, *args: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            *self.helper,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await p.communicate()
        if p.returncode:
            log.warning("%s: %s", " ".join(args[:2]), err.decode(errors="replace").strip()[:300])
        return p.returncode or 0, out.decode()

    async def load(self) -> None:
        code, out = await self.call("gated-config")
        if code:
            return
        table = {int(r["listen"]): r for r in json.loads(out)}
        for port in set(self.servers) - set(table):
            self.servers.pop(port).close()
        for port in table:
            if port not in self.servers:
                try:
                    self.servers[port] = await asyncio.start_server(
                        self.handler_for(port), table[port].get("bind", "127.0.0.1"), port
                    )
                except OSError as err:
                    log.error("cannot listen on %s: %s", port, err)
        self.table = table

    def handler_for(self, port: int) -> Any:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.handle(reader, writer, port)

        return handler

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        row = self.table.get(port)
        if row is None:
            writer.close()
            return
        owner = str(row["owner"])
        target = f"{owner}:{row['name']}"
        peer = (target, str((writer.get_extra_info("peername") or ("?",))[0]))
        if (
            self.conns.get(target, 0) >= PER_VM
            or self.owners.get(owner, 0) >= PER_OWNER
            or self.peers.get(peer, 0) >= PER_PEER
            or self.total >= self.budget
        ):
            log.warning(
                "refused a connection to %s: too many open (limits: %d per VM, %d per owner, %d per client)",
                target,
                PER_VM,
                PER_OWNER,
                PER_PEER,
            )
            writer.close()
            return
        self.conns[target] = self.conns.get(target, 0) + 1
        self.owners[owner] = self.owners.get(owner, 0) + 1
        self.peers[peer] = self.peers.get(peer, 0) + 1
        self.total += 1
        try:
            if self.conns[target] == 1:
                # The first connection: hold the owner logged on, and wake the VM. A frozen
                # VM's QEMU still accepts TCP (the guest would just never answer), so a
                # successful connect proves nothing; waking is idempotent.
                await asyncio.gather(
                    self.call("gated-hold", target, "--on", "--pid", str(os.getpid())), self.call("gated-wake", target)
                )
            now = time.monotonic()
            if now - self.used.get(target, -USED_EVERY) >= USED_EVERY:  # the memory budget's "least recently used"
                self.used[target] = now
                await self.call("gated-used", target)
            upstream = await self.reach(port, owner)
            if upstream is None:
                return
            await self.pipe(reader, writer, *upstream)
        finally:
            self.conns[target] -= 1
            self.owners[owner] -= 1
            self.peers[peer] -= 1
            if not self.peers[peer]:
                del self.peers[peer]
            self.total -= 1
            self.last[target] = time.monotonic()
            if self.conns[target] == 0:
                await self.call("gated-hold", target, "--off", "--pid", str(os.getpid()))
            with contextlib.suppress(Exception):
                writer.close()

    async def reach(self, port: int, owner: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the guest's forward, retrying while a woken VM comes up; only
        to a port the VM's QEMU (running as its owner) listens on, never to some
        other program that took it. A start may have moved the internal port away
        from such a program: after a moment without QEMU on it, read the table again."""
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            return None
        start = time.monotonic()
        reloaded = False
        while time.monotonic() < start + CONNECT_TIMEOUT:
            row = self.table.get(port)
            if row is None:
                return None
            internal = int(row["internal"])
            if sockets.held_by(internal, uid):
                with contextlib.suppress(OSError):
                    return await asyncio.open_connection("127.0.0.1", internal)
            elif not reloaded and time.monotonic() > start + RELOAD_AFTER:
                reloaded = True
                await self.load()
            await asyncio.sleep(0.05)
        return None

    @staticmethod
    async def pipe(
        r1: asyncio.StreamReader, w1: asyncio.StreamWriter, r2: asyncio.StreamReader, w2: asyncio.StreamWriter
    ) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.write_eof()

        await asyncio.gather(copy(r1, w2), copy(r2, w1))
        w2.close()

    async def idle_loop(self) -> None:
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for row in list(self.table.values()):
                target = f"{row['owner']}:{row['name']}"
                idle = int(row.get("idle") or 0)
                if idle and not self.conns.get(target) and now - self.last.get(target, now) > idle:
                    self.last.pop(target, None)
                    await self.call("gated-idle", target)


def _loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own errors (an accept that failed for lack of descriptors...): one
    rate-limited line each, never a traceback per event."""
    err = context.get("exception")
    log.error("%s%s", context.get("message", "event loop error"), f": {err}" if err else "")


async def serve() -> None:
    paths = installed()
    helper = [paths.helper] if os.geteuid() == 0 else [paths.sudo, "-n", "--", paths.helper]
    gate = Gate(helper, descriptor_budget())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_errors)
    await gate.load()
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(gate.load()))
    stop: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish)
    idle = asyncio.ensure_future(gate.idle_loop())
    print(f"kvmgate-gated: listening on {sorted(gate.servers)}", flush=True)
    await stop
    idle.cancel()


def main() -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kvmgate-gated: %(message)s"))
    handler.addFilter(RateLimit())
    log.addHandler(handler)
    log.propagate = False
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
