"""Audit records: one JSON line per privileged action or refusal, to syslog
(authpriv) and to a root-only file, so a refusal is never silent.

Nothing a caller sends sizes the log:
- A record's size is bounded whatever the caller sent (a refused start with a
  120 kB `-append` once wrote 120 kB a call): each string keeps its first
  MAX_STRING characters plus its length and SHA-256, each list its first
  MAX_ITEMS entries plus a count. Verb, caller, VM and outcome are always whole.
- Refusals by an unprivileged caller are rate-limited per uid (host.audit_rate).
  Actions that succeeded are never held back: each costs its caller real work
  (a QEMU start).
- The file is rotated by the helper itself at MAX_LOG bytes, keeping
  GENERATIONS old files (audit.log.1 is the newest); logrotate's snippet is extra.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import syslog
import time
from typing import Any

from kvmgate.host.caller import Caller
from kvmgate.model.digest import hexdigest


def done(path: str, caller: Caller, verb: str, owner: str, vm: str, **extra: Any) -> None:
    """The record of an action that succeeded."""
    record(path, caller=caller.name, uid=caller.uid, verb=verb, vm=vm, owner=owner, outcome="ok", **extra)


MAX_STRING = 512
MAX_ITEMS = 64


def bounded(value: Any) -> Any:
    """The value, or a summary of it that identifies it (length and SHA-256)."""
    if isinstance(value, str):
        if len(value) <= MAX_STRING:
            return value
        digest = hexdigest(value.encode(errors="surrogateescape"))[:16]
        return f"{value[:MAX_STRING]}...[{len(value)} characters, sha256 {digest}]"
    if isinstance(value, (list, tuple)):
        items = [bounded(v) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"...[{len(value)} items]")
        return items
    if isinstance(value, dict):
        return {k: bounded(v) for k, v in list(value.items())[:MAX_ITEMS]}
    return value


MAX_LOG = 64 << 20
GENERATIONS = 8


def record(path: str, **event: Any) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **{k: bounded(v) for k, v in event.items()}}
    line = json.dumps(event, sort_keys=True)
    with contextlib.suppress(OSError):
        syslog.openlog("kvmgate", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE if event.get("outcome") == "ok" else syslog.LOG_WARNING, line)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
            full = os.fstat(fd).st_size > MAX_LOG
        finally:
            os.close(fd)
        if full:
            _rotate(path)


def _rotate(path: str) -> None:
    """audit.log -> audit.log.1 -> ... -> audit.log.GENERATIONS (dropped), under a
    lock, and only if the file is still too big once the lock is held."""
    fd = os.open(path + ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.lstat(path).st_size <= MAX_LOG:
                return  # another writer rotated it
        except FileNotFoundError:
            return
        for n in range(GENERATIONS - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{path}.{n}", f"{path}.{n + 1}")
        os.rename(path, f"{path}.1")
    finally:
        os.close(fd)
