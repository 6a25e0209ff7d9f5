"""Logon integration: the design note's second logon path.

pam_exec runs `kvmgate-pam` (this hook) as root at every session open and close
(common-session: ssh, su -l, login). The hook counts each user's sessions: one
record per session leader (the process that opened the PAM session, kept with
its start time so a reused pid is not mistaken for it). Dead leaders are pruned
at every event and by `kvmgate admin reap` (a timer), so a crashed session
never keeps a VM awake, nor asleep.

- first session opened: the user's VMs with a session policy are thawed
  (resumed, or restored if hibernated);
- last session closed: they are paused or hibernated, per `--on-logoff`.

The hook never blocks or breaks a login: the bookkeeping is a few file
operations under a lock with a hard time limit, the VM work runs in a detached
process, every error goes to the audit log, and the hook always exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import signal
from collections.abc import Iterator

from .. import registry
from ..errors import KvmgateError
from ..paths import Paths
from . import audit
from .caller import Caller
from .main import Request

HOOK_SECONDS = 5  # the hook's own bound; VM work happens after it returned
WORK_SECONDS = 3600
PAM_FILE = "/etc/pam.d/common-session"
MARK = "# kvmgate: thaw VMs at a user's first logon, freeze or hibernate them at the last logoff"


def _leader_start(pid: int) -> int | None:
    try:
        return registry.process_start(pid)
    except (OSError, ValueError, IndexError):
        return None


class Sessions:
    """RUN/sessions/<user>/<pid>-<starttime>, one file per live session."""

    def __init__(self, paths: Paths, user: str) -> None:
        self.root = os.path.join(paths.run, "sessions")
        self.dir = os.path.join(self.root, user)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.dir, 0o700, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> list[str]:
        try:
            return sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []

    def prune(self) -> tuple[int, int]:
        """Drop records of sessions whose leader is gone. Returns (before, after)."""
        names = self.records()
        live = 0
        for name in names:
            pid_s, _, rest = name.partition("-")
            start_s = rest.partition("-")[0]
            if pid_s.isdigit() and start_s.isdigit() and _leader_start(int(pid_s)) == int(start_s):
                live += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
        return len(names), live

    def add(self, pid: int, tag: str = "") -> None:
        start = _leader_start(pid)
        if start is not None:
            name = f"{pid}-{start}" + (f"-{tag}" if tag else "")
            os.close(os.open(os.path.join(self.dir, name), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))

    def remove(self, pid: int, tag: str = "") -> None:
        for name in self.records():
            parts = name.split("-", 2)
            if parts[0] == str(pid) and (parts[2] if len(parts) > 2 else "") == tag:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))


def hook(environ: dict[str, str], paths: Paths) -> int:
    """pam_exec entry point. Always returns 0."""
    user, kind = environ.get("PAM_USER", ""), environ.get("PAM_TYPE", "")
    try:
        signal.alarm(HOOK_SECONDS)
        if kind not in ("open_session", "close_session") or not user:
            return 0
        try:
            if pwd.getpwnam(user).pw_uid == 0:
                return 0
        except KeyError:
            return 0
        sessions = Sessions(paths, user)
        leader = os.getppid()  # the process that opened (and will close) the PAM session
        with sessions.locked():
            _, live = sessions.prune()
            if kind == "open_session":
                sessions.add(leader)
                action = "thaw" if live == 0 else None
            else:
                sessions.remove(leader)
                action = "logoff" if sessions.prune()[1] == 0 else None
        signal.alarm(0)
        if action:
            _detach(lambda: apply(paths, user, action))
    except Exception as err:  # noqa: BLE001 - a login must never fail because of kvmgate
        audit.record(paths.audit_log, caller="pam", verb=f"pam {kind}", owner=user, outcome="error", reason=str(err))
    return 0


def _detach(work: object) -> None:
    """Run work in a detached grandchild so pam_exec (and the login) need not wait."""
    if os.fork():
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        signal.alarm(WORK_SECONDS)
        work()  # type: ignore[operator]
    finally:
        os._exit(0)


def apply(paths: Paths, user: str, action: str) -> None:
    """Thaw, or freeze/hibernate per policy, each of user's VMs that has a session policy.

    Workers for one user run one at a time (a lock), and each decides on the
    session count as it is when it runs, not as it was when it was spawned: a
    logoff immediately followed by a logon can never leave the VM asleep under
    a logged-on user, nor awake after they left.
    """
    sessions_of = Sessions(paths, user)
    locks = os.path.join(paths.run, "logon-work")
    os.makedirs(locks, 0o700, exist_ok=True)
    fd = os.open(os.path.join(locks, user), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with sessions_of.locked():
            live = sessions_of.prune()[1]
        if (action == "thaw") != (live > 0):
            return  # the situation changed since this worker was spawned; a later one handles it
        _apply(paths, user, action)
    finally:
        os.close(fd)


def _apply(paths: Paths, user: str, action: str) -> None:
    from . import hibernate, sessions

    who = Caller(0, "pam", False)
    for owner, name in registry.list_names(paths, user):
        try:
            vm = registry.resolve(paths, owner, name)
            mode = registry.read_settings(vm)["on_logoff"]
            if mode == "none":
                continue
            running = registry.is_running(vm)
            if action == "thaw":
                if running or hibernate.meta_of(vm) is not None:
                    sessions.run(_request("thaw", name), who, paths, vm)
            elif running:
                sessions.run(_request("freeze" if mode == "pause" else "hibernate", name), who, paths, vm)
        except (KvmgateError, OSError) as err:
            audit.record(
                paths.audit_log,
                caller="pam",
                verb=f"logon {action}",
                vm=name,
                owner=owner,
                outcome="error",
                reason=str(err),
            )


def _request(verb: str, name: str) -> Request:
    req = Request(verb)
    req.name = name
    return req


CONSOLE_LOG_MAX = 8 << 20


def trim_console_logs(paths: Paths) -> None:
    """A guest can print to its serial port without end, and QEMU's console log has
    no size limit: empty every log past CONSOLE_LOG_MAX (QEMU appends, so it simply
    continues at the start; readers notice the file shrank)."""
    for owner, name in registry.list_names(paths):
        with contextlib.suppress(KvmgateError, OSError):
            vm = registry.resolve(paths, owner, name)
            log = vm.sub("log", "console.log")
            if os.stat(log).st_size > CONSOLE_LOG_MAX:
                os.truncate(log, 0)
                print(f"emptied the console log of {owner}/{name}")


def reap(paths: Paths) -> None:
    """Prune sessions whose leaders died without closing (crashes, kill -9) and
    apply the logoff policy for users left with none; keep console logs bounded.
    Run every minute by kvmgate-reap.timer."""
    trim_console_logs(paths)
    root = os.path.join(paths.run, "sessions")
    try:
        users = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for user in users:
        sessions = Sessions(paths, user)
        with sessions.locked():
            before, live = sessions.prune()
        if before and not live:
            apply(paths, user, "logoff")
            print(f"reaped the sessions of {user}")


def hook_path(paths: Paths) -> str:
    return os.path.join(os.path.dirname(paths.helper), "kvmgate-pam")


def install_pam(paths: Paths, pam_file: str = PAM_FILE) -> str:
    line = f"session optional pam_exec.so quiet {hook_path(paths)}"
    with open(pam_file) as f:
        text = f.read()
    if line in text.splitlines():
        return f"{pam_file} already runs {hook_path(paths)}"
    backup = pam_file + ".kvmgate-backup"
    if not os.path.exists(backup):
        with open(backup, "w") as f:
            f.write(text)
    _replace(pam_file, text.rstrip("\n") + f"\n{MARK}\n{line}\n")
    return f"{pam_file} now runs {hook_path(paths)} (backup: {backup}; undo: kvmgate admin init --no-pam)"


def uninstall_pam(paths: Paths, pam_file: str = PAM_FILE) -> str:
    line = f"session optional pam_exec.so quiet {hook_path(paths)}"
    with open(pam_file) as f:
        lines = f.read().splitlines()
    kept = []
    for i, ln in enumerate(lines):
        if ln == line or (ln == MARK and i + 1 < len(lines) and lines[i + 1] == line):
            continue
        kept.append(ln)
    if kept == lines:
        return f"{pam_file} does not run {hook_path(paths)}"
    _replace(pam_file, "\n".join(kept) + "\n")
    return f"removed {hook_path(paths)} from {pam_file}"


def _replace(path: str, text: str) -> None:
    st = os.stat(path)
    tmp = path + ".kvmgate-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.replace(tmp, path)
