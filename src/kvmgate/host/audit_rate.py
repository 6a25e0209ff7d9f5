"""Refusals by an unprivileged caller are rate-limited per uid, so that a loop
of refusals cannot flood the audit log or push other records out of it.

A token bucket per uid (the policy's audit_burst at once, then one per
audit_refill_seconds), kept in LOG/audit.log.rate/<uid>. What is held back is
counted and written as one summary record (outcome "suppressed", with
held_back and since) before that caller's next record, or by `admin reap`
within a minute. Imported only when there is a refusal to record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Any

from kvmgate.host.audit import record
from kvmgate.paths import Paths

BURST = 20  # defaults of the policy's audit_burst and audit_refill_seconds
REFILL_SECONDS = 5


def refusal(path: str, uid: int, rate: tuple[int, int] = (BURST, REFILL_SECONDS), **event: Any) -> None:
    """The record of a refusal (or a failure) for `uid`: rate-limited unless root.
    rate: (burst, refill seconds). A helper that has dropped to its caller
    (console, log) reaches syslog only."""
    if os.geteuid() != 0:
        record(None, uid=uid, **event)
        return
    if uid == 0:
        record(path, uid=uid, **event)
        return
    allowed, held = _admit(path, uid, time.time(), rate)
    if held:
        record(path, uid=uid, caller=event.get("caller"), verb="audit", outcome="suppressed", **held)
    if allowed:
        record(path, uid=uid, **event)


def _admit(
    path: str, uid: int, now: float, rate: tuple[int, int] = (BURST, REFILL_SECONDS), flush: bool = False
) -> tuple[bool, dict[str, Any]]:
    """One token from uid's bucket. Returns (record it?, the summary of what was
    held back, to write first, or {}). flush: only take the summary."""
    burst, refill = rate
    rates = path + ".rate"
    with contextlib.suppress(FileExistsError):
        os.mkdir(rates, 0o700)
    fd = os.open(os.path.join(rates, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            state = json.loads(os.pread(fd, 4096, 0) or b"{}")
            tokens, last = float(state.get("tokens", burst)), float(state.get("t", now))
            held, since = int(state.get("held", 0)), float(state.get("since", 0))
        except (ValueError, TypeError, AttributeError):
            tokens, last, held, since = float(burst), now, 0, 0.0
        tokens = min(float(burst), tokens + max(0.0, now - last) / refill)
        summary: dict[str, Any] = {}
        allowed = False
        if not flush and tokens >= 1:
            tokens -= 1
            allowed = True
        elif not flush:
            held, since = held + 1, since or now
        if held and (allowed or flush):
            summary = {"held_back": held, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))}
            held, since = 0, 0.0
        data = json.dumps({"tokens": tokens, "t": now, "held": held, "since": since}).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        return allowed, summary
    finally:
        os.close(fd)


def flush_held(path: str) -> int:
    """Write the summary of every caller's held-back refusals (`admin reap`)."""
    written = 0
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(path + ".rate")):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError):
                _, held = _admit(path, int(name), time.time(), flush=True)
                if held:
                    record(path, uid=int(name), verb="audit", outcome="suppressed", **held)
                    written += 1
    return written


def rate_for(paths: Paths) -> tuple[int, int]:
    """The policy's audit rate; the defaults when the policy itself is the trouble."""
    try:
        from kvmgate.store import config

        policy = config.load(paths)
    except Exception:  # noqa: BLE001 - a broken policy must not silence the record of its refusal
        return BURST, REFILL_SECONDS
    return policy.audit_burst, policy.audit_refill_seconds
