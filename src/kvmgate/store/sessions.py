"""Session records: one file per live session of a user in RUN/sessions/<user>/
(STATE/sessions/<user>/ on a Slurm cluster, shared by every login node, each
record named `<host>@...` after the login node that made it):

- `<pid>-<starttime>[-tag]`: a login's session leader (the PAM hook), or a
  connection kvmgate-gated holds. A record whose process is gone (crash,
  kill -9) is pruned at every event and by the reaper, so a crashed session
  never keeps a VM awake, nor asleep.
- `logind-<id>`: a logind session (`admin sessions --watch`, host.logind).
  Whether it is alive is logind's to say: the caller passes `logind_alive`.

A login node prunes only its own records (another node's processes are not in
its /proc); another node's records count as live until that node prunes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator

from kvmgate.paths import Paths
from kvmgate.store import critical
from kvmgate.store.runtime import process_start

LOGIND = "logind-"


def _leader_start(pid: int) -> int | None:
    try:
        return process_start(pid)
    except (OSError, ValueError, IndexError):
        return None


class Sessions:
    """RUN/sessions/<user>/<pid>-<starttime>, one file per live session."""

    def __init__(self, paths: Paths, user: str) -> None:
        shared = os.path.join(paths.state, "sessions")  # made by `admin init --backend slurm`
        self.host = socket.gethostname() + "@" if os.path.isdir(shared) else ""
        self.root = shared if self.host else os.path.join(paths.run, "sessions")
        self.dir = os.path.join(self.root, user)

    def _own(self, name: str) -> str | None:
        """The record's name without this login node's prefix; None: another node's."""
        return (
            name.removeprefix(self.host)
            if name.startswith(self.host) and "@" not in name.removeprefix(self.host)
            else None
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.dir, 0o700, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with critical.section():
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly, as store.files.flock does
        finally:
            os.close(fd)

    def live(self, logind_alive: Callable[[str], bool] | None = None) -> int:
        """The number of live sessions, pruning dead records; creates nothing."""
        if not os.path.isdir(self.dir):
            return 0
        with self.locked():
            return self.prune(logind_alive)[1]

    def records(self) -> list[str]:
        try:
            return sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []

    def prune(self, logind_alive: Callable[[str], bool] | None = None) -> tuple[int, int]:
        """Drop records of sessions whose leader is gone. Returns (before, after).
        Without `logind_alive`, logind's records are taken as alive."""
        names = self.records()
        live = 0
        for full in names:
            name = self._own(full)
            if name is None:
                live += 1  # another login node's, which only that node can check
                continue
            if name.startswith(LOGIND):
                if logind_alive is None or logind_alive(name[len(LOGIND) :]):
                    live += 1
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, full))
                continue
            pid_s, _, rest = name.partition("-")
            start_s = rest.partition("-")[0]
            if pid_s.isdigit() and start_s.isdigit() and _leader_start(int(pid_s)) == int(start_s):
                live += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, full))
        return len(names), live

    def logind(self) -> set[str]:
        own = [n for n in map(self._own, self.records()) if n is not None]
        return {n[len(LOGIND) :] for n in own if n.startswith(LOGIND)}

    def set_logind(self, ids: set[str]) -> None:
        """Make the user's logind records exactly `ids` (checked session ids)."""
        old = self.logind()
        for sid in ids - old:
            record = os.path.join(self.dir, self.host + LOGIND + sid)
            os.close(os.open(record, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        for sid in old - ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dir, self.host + LOGIND + sid))

    def add(self, pid: int, tag: str = "", start: int | None = None) -> None:
        """Record the session whose leader is `pid`; `start`: its start time as
        read when the session opened (else read now). A leader that is gone, or a
        pid that is another process now, is pruned at once."""
        start = _leader_start(pid) if start is None else start
        if start is not None:
            name = f"{self.host}{pid}-{start}" + (f"-{tag}" if tag else "")
            os.close(os.open(os.path.join(self.dir, name), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))

    def remove(self, pid: int, tag: str = "") -> None:
        for full in self.records():
            parts = (self._own(full) or "@").split("-", 2)
            if parts[0] == str(pid) and (parts[2] if len(parts) > 2 else "") == tag:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, full))
