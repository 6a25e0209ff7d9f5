"""Audit records: one JSON line per privileged action or refusal, to syslog
(authpriv) and to a root-only file, so a refusal is never silent."""

from __future__ import annotations

import contextlib
import json
import os
import syslog
import time
from typing import Any

from kvmgate.host.caller import Caller


def done(path: str, caller: Caller, verb: str, owner: str, vm: str, **extra: Any) -> None:
    """The record of an action that succeeded."""
    record(path, caller=caller.name, uid=caller.uid, verb=verb, vm=vm, owner=owner, outcome="ok", **extra)


def record(path: str, **event: Any) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
    line = json.dumps(event, sort_keys=True)
    with contextlib.suppress(OSError):
        syslog.openlog("kvmgate", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE if event.get("outcome") == "ok" else syslog.LOG_WARNING, line)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
