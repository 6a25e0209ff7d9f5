"""Audit records: one JSON line per privileged action or refusal, to syslog
(authpriv) and to a root-only file, so a refusal is never silent.

Nothing a caller sends sizes the log:
- A record is at most MAX_RECORD (4 KiB) whatever the caller sent (a refused
  start with a 120 kB `-append` once wrote 120 kB a call): each string keeps
  its first MAX_STRING characters plus its length and SHA-256, each list its
  first MAX_ITEMS entries plus a count, and tighter passes keep less until the
  record fits. Verb, caller, VM and outcome are always whole.
- Refusals by an unprivileged caller are rate-limited per uid (host.audit_rate).
  Actions that succeeded are never held back: each costs its caller real work
  (a start is recorded only once QEMU has answered).
- The file is rotated by the helper itself at MAX_LOG bytes, keeping
  GENERATIONS old files (audit.log.1 is the newest); logrotate's snippet is extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import syslog
import time
from typing import Any

from kvmgate.host.caller import Caller
from kvmgate.model.digest import hexdigest


def done(path: str, caller: Caller, verb: str, owner: str | None, vm: str, **extra: Any) -> None:
    """The record of an action that succeeded."""
    record(path, caller=caller.name, uid=caller.uid, verb=verb, vm=vm, owner=owner, outcome="ok", **extra)


MAX_STRING = 512
MAX_ITEMS = 64
MAX_RECORD = 4096  # bytes per record, whatever its fields hold
# Each tighter pass keeps less of every string and list, until the record fits.
PASSES = ((MAX_STRING, MAX_ITEMS), (128, 16), (32, 4), (0, 0))


def bounded(value: Any, strings: int = MAX_STRING, items: int = MAX_ITEMS) -> Any:
    """The value, or a summary of it that identifies it (length and SHA-256)."""
    if isinstance(value, str):
        if len(value) <= strings:
            return value
        digest = hexdigest(value.encode(errors="surrogateescape"))[:16]
        return f"{value[:strings]}...[{len(value)} characters, sha256 {digest}]"
    if isinstance(value, (list, tuple)):
        kept = [bounded(v, strings, items) for v in value[:items]]
        if len(value) > items:
            kept.append(f"...[{len(value)} items]")
        return kept
    if isinstance(value, dict):
        return {k: bounded(v, strings, items) for k, v in list(value.items())[:items]}
    return value


# Kept whole (up to WHOLE_MAX characters, which their grammars stay under once
# checked): they say who did what to which VM. A refusal may carry them unchecked.
WHOLE = ("time", "caller", "uid", "verb", "vm", "owner", "outcome", "exit")
WHOLE_MAX = 256


def line_for(event: dict[str, Any]) -> str:
    """The record as one JSON line of at most MAX_RECORD bytes, always valid JSON
    and always with its whole fields."""
    whole = {k: bounded(v, WHOLE_MAX, MAX_ITEMS) for k, v in event.items() if k in WHOLE}
    rest = {k: v for k, v in event.items() if k not in WHOLE}
    for strings, items in PASSES:
        line = json.dumps({**whole, **{k: bounded(v, strings, items) for k, v in rest.items()}}, sort_keys=True)
        if len(line) <= MAX_RECORD:
            return line
    return json.dumps({**whole, "dropped": sorted(rest)}, sort_keys=True)


MAX_LOG = 64 << 20
GENERATIONS = 8


def record(path: str | None, **event: Any) -> None:
    """To syslog (authpriv), and to the file at `path` (None: syslog only, for a
    helper that has dropped to its caller)."""
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
    line = line_for(event)
    with contextlib.suppress(OSError):
        syslog.openlog("kvmgate", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE if event.get("outcome") == "ok" else syslog.LOG_WARNING, line)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, line.encode() + b"\n") <= len(line):
                raise OSError(28, "a short write")  # a nearly full filesystem
            full = os.fstat(fd).st_size > MAX_LOG
        finally:
            os.close(fd)
        if full:
            from kvmgate.host import audit_rotate  # past MAX_LOG only

            audit_rotate.rotate(path, MAX_LOG, GENERATIONS)
    except OSError as err:  # a full /var/log: the record above reached syslog; say that the file missed it
        with contextlib.suppress(OSError):
            syslog.syslog(syslog.LOG_ERR, f"{path}: a record was not written: {err.strerror or err}")
