"""Logon sessions as systemd-logind (or elogind) keeps them, read through
sd-login, logind's own C API (libsystemd, or libelogind where elogind runs).

Where logind runs, it already knows every session: who, of which class, through
which PAM service, whether it is closing. So the login path does no kvmgate
work at all (no PAM hook): `kvmgate admin sessions --watch` (kvmgate-sessions
.service) waits on sd-login's monitor and brings kvmgate's session records in
line with logind's. The identity is logind's (the session's uid, set by
pam_systemd in the login's own PAM stack), never anything a user can write.

A session counts as a logon when its PAM service is one of the policy's
`logon_services` (sshd and login: not `su -l`, not cron), its class is `user`
or `background` (pam_systemd gives a login without a terminal, such as a
one-shot `ssh host CMD`, the class `background`; greeters and lock screens do
not count), and its state is `online` or `active` (not `closing`: a user who
logged out but left a process behind has logged out).
Lingering (`loginctl enable-linger`) creates no session, so it never keeps a
VM awake.

Loaded only by the watcher and the reaper: ctypes is heavy for the helper.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import NamedTuple

LIBRARIES = ("libsystemd.so.0", "libelogind.so.0")
LIVE_STATES = ("online", "active")
MAX_SESSIONS = 1 << 16  # more sessions than that is not a host kvmgate was built for


class Session(NamedTuple):
    id: str
    uid: int
    cls: str
    state: str
    service: str


class Unavailable(Exception):
    """No sd-login library, or logind is not running."""


def _lib() -> ctypes.CDLL:
    for name in LIBRARIES:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.free = ctypes.CDLL(None).free  # type: ignore[attr-defined]
        return lib
    raise Unavailable("neither libsystemd nor libelogind is installed")


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    return _LIB


def running() -> bool:
    """Is a logind (systemd's or elogind) keeping sessions on this host?"""
    return os.path.isdir("/run/systemd/seats") and os.path.isdir("/run/systemd/sessions")


def _string(fn: str, sid: bytes) -> str:
    """One of sd_session_get_*'s strings, freed after copying."""
    out = ctypes.c_void_p()
    if getattr(lib(), fn)(sid, ctypes.byref(out)) < 0 or not out.value:
        return ""
    try:
        return (ctypes.string_at(out.value) or b"").decode("ascii", "replace")
    finally:
        lib().free(out)


def session(sid: str) -> Session | None:
    """The session `sid`, or None if logind does not know it (any more)."""
    raw = sid.encode("ascii", "replace")
    uid = ctypes.c_uint()
    if lib().sd_session_get_uid(raw, ctypes.byref(uid)) < 0:
        return None
    return Session(
        sid, uid.value, _string("sd_session_get_class", raw), _string("sd_session_get_state", raw),
        _string("sd_session_get_service", raw),
    )  # fmt: skip


def sessions() -> list[Session]:
    arr = ctypes.POINTER(ctypes.c_void_p)()
    n = lib().sd_get_sessions(ctypes.byref(arr))
    if n < 0:
        raise Unavailable(f"sd_get_sessions failed ({os.strerror(-n)})")
    out = []
    try:
        for i in range(min(n, MAX_SESSIONS)):
            p = arr[i]
            sid = ctypes.string_at(p).decode("ascii", "replace") if p else ""
            if sid and (s := session(sid)) is not None:
                out.append(s)
    finally:
        for i in range(n):
            lib().free(arr[i])
        lib().free(arr)
    return out


def counts(s: Session, services: tuple[str, ...]) -> bool:
    return s.cls in ("user", "background") and s.state in LIVE_STATES and s.service in services


def alive(sid: str) -> bool:
    """Is the session still open (not closing, not gone)?"""
    s = session(sid)
    return s is not None and s.state in LIVE_STATES


class Monitor:
    """sd-login's monitor: a descriptor that becomes readable when sessions change."""

    def __init__(self) -> None:
        self.handle = ctypes.c_void_p()
        r = lib().sd_login_monitor_new(b"session", ctypes.byref(self.handle))
        if r < 0:
            raise Unavailable(f"sd_login_monitor_new failed ({os.strerror(-r)})")
        self.fd = int(lib().sd_login_monitor_get_fd(self.handle))

    def flush(self) -> None:
        lib().sd_login_monitor_flush(self.handle)

    def close(self) -> None:
        lib().sd_login_monitor_unref(self.handle)
