"""Hibernate (save the whole VM to its directory, then end QEMU) and restore.

Both directions stream through a pipe that the helper passes to QEMU with
`getfd` (the sandbox forbids `migrate exec:`), so the helper hashes the stream
as it goes, at no extra disk read. Guarantees:
- the state is written to `saved/state.tmp`, fsynced, then renamed, and only
  then is `saved/state.json` (time, size, SHA-256, how to restart) written the
  same way: a state without its record is never used;
- if saving fails (disk full, helper killed), QEMU stays where it was: paused if
  it was paused, running again if it was running; nothing is deleted;
- a restore checks size and checksum of the stream it fed QEMU before letting
  the vCPUs run, and deletes the state only after the VM runs again; a failed
  restore leaves the state in place and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, NamedTuple

from .. import registry
from ..digest import sha256
from ..errors import KvmgateError
from ..qmp import QMP, QMPError

STATE = "state"
META = "state.json"
BANDWIDTH = 64 << 30  # bytes/s: QEMU's 128 MiB/s default makes saving several times slower
CHUNK = 1 << 20


class Saved(NamedTuple):
    saved_at: float
    size: int
    sha256: str
    options: list[str]
    was_running: bool


def meta_of(vm: registry.VM) -> Saved | None:
    """The saved state's record, if the state is complete (its size matches)."""
    try:
        with open(vm.sub("saved", META), "rb") as f:
            data = json.loads(f.read(1 << 20))
        saved = Saved(
            float(data["saved_at"]),
            int(data["size"]),
            str(data["sha256"]),
            [str(t) for t in data["options"]],
            bool(data["was_running"]),
        )
        if os.stat(vm.sub("saved", STATE)).st_size != saved.size:
            return None
        return saved
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _progress(done: int, what: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{what}: {done >> 20} MiB")
        sys.stderr.flush()


def _wait_migration(q: QMP, deadline: float) -> str:
    while time.monotonic() < deadline:
        status = str(q.execute("query-migrate").get("status", "none"))
        if status in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.01)
    return "timeout"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(vm: registry.VM, options: list[str], timeout: float = 3600) -> Saved:
    """Save the running or paused VM into saved/, then quit QEMU."""
    saved_dir = vm.sub("saved")
    tmp = os.path.join(saved_dir, STATE + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    r, w = os.pipe()
    h, size, was_running = sha256(b""), 0, False
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=30) as q:
            was_running = q.execute("query-status").get("status") == "running"
            if was_running:
                q.execute("stop")
            try:
                q.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
                q.execute("getfd", {"fdname": "kgmig"}, fds=[w])
                os.close(w)
                w = -1
                q.execute("migrate", {"uri": "fd:kgmig"})
                while chunk := os.read(r, CHUNK):  # EOF once QEMU is done with the stream
                    h.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
                    size += len(chunk)
                    _progress(size, "saving")
                status = _wait_migration(q, time.monotonic() + timeout)
                if status != "completed":
                    raise KvmgateError(f"saving failed: migration {status}")
                os.fsync(out)
            except BaseException:
                os.close(r)
                r = -1
                with contextlib.suppress(OSError, QMPError):
                    q.execute("migrate_cancel")
                    _wait_migration(q, time.monotonic() + 10)
                if was_running:
                    with contextlib.suppress(OSError, QMPError):
                        q.execute("cont")
                raise
            os.rename(tmp, os.path.join(saved_dir, STATE))
            saved = Saved(time.time(), size, h.hexdigest(), options, was_running)
            _write_json(os.path.join(saved_dir, META), saved._asdict())
            _fsync_dir(saved_dir)
            with contextlib.suppress(OSError, QMPError):
                q.execute("quit")
    except OSError as err:
        raise KvmgateError(
            f"saving failed: {err.strerror or err}; the VM is {'running again' if was_running else 'still paused'}"
            ", nothing was lost"
        ) from None
    finally:
        for fd in (r, w, out):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    return saved


def restore(vm: registry.VM, saved: Saved, timeout: float = 3600) -> None:
    """Feed the saved state to a QEMU started with `-incoming defer -S`, check it,
    then let it run (if it ran when saved) and delete the state."""
    src = os.open(vm.sub("saved", STATE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    r, w = os.pipe()
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=30) as q:
            q.execute("getfd", {"fdname": "kgmig"}, fds=[r])
            os.close(r)
            r = -1
            q.execute("migrate-incoming", {"uri": "fd:kgmig"})
            h, size = sha256(b""), 0
            while chunk := os.read(src, CHUNK):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(w, view) :]
                size += len(chunk)
                _progress(size, "restoring")
            os.close(w)
            w = -1
            if (size, h.hexdigest()) != (saved.size, saved.sha256):
                raise KvmgateError("restore failed: the saved state is corrupt (size or checksum differs); it was kept")
            status = _wait_migration(q, time.monotonic() + timeout)
            if status != "completed":
                raise KvmgateError(f"restore failed: migration {status}; the saved state was kept")
            if saved.was_running:
                q.execute("cont")
    except (OSError, QMPError) as err:
        raise KvmgateError(f"restore failed: {err}; the saved state was kept") from None
    finally:
        for fd in (r, w, src):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    # Only now, with the VM back, is the state expendable.
    for name in (META, STATE):
        os.unlink(vm.sub("saved", name))
    _fsync_dir(vm.sub("saved"))
