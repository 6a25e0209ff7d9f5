"""Logon integration: the design note's second logon path.

Sessions come from one of two sources, into the same records (store.sessions):
- where logind (systemd's, or elogind) runs, from logind itself:
  `admin sessions --watch` (kvmgate-sessions.service) follows sd-login's
  monitor and keeps one record per logind session that counts as a logon
  (host.logind); the login path does no kvmgate work at all;
- elsewhere, from the PAM hook (`admin init --pam`):

pam_exec runs `kvmgate-pam` (this hook) as root at every session open and close
of the services that count as logons (sshd and login: host.pam). The hook counts each user's sessions: one
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
import re
import signal
import sys
import time

from kvmgate.errors import KvmgateError, one_line
from kvmgate.host import audit, audit_rate
from kvmgate.host.caller import Caller, scrub
from kvmgate.host.detach import detach
from kvmgate.model.commands import Request
from kvmgate.ops import power, resume
from kvmgate.paths import Paths, installed
from kvmgate.store import config, critical, every, jobs, registry
from kvmgate.store.files import taken
from kvmgate.store.sessions import Sessions

WORK_SECONDS = 3600


def main(argv: list[str], paths: Paths | None = None) -> int:
    """kvmgate-pam --spool: the PAM hook's worker, started detached, with an empty
    environment, by kvmgate-pam-start (packaging/pam), which records each session
    event as a file in RUN/pam-events. Always 0."""
    if os.geteuid() != 0 or argv != ["--spool"]:
        return 0  # run by hand by a user, or an old PAM line (install.sh replaces those)
    paths = paths or installed()
    try:
        held = _handed_lock(paths)
        scrub(keep=held)
        drain_spool(paths, held)
    except Exception as err:  # noqa: BLE001
        audit.record(paths.audit_log, caller="pam", verb="pam", outcome="error", reason=one_line(err))
    return 0


SPOOL = "pam-events"
# uptime (1/100 s), loginuid, leader pid, its start time, event, PAM service, PAM_USER
EVENT = re.compile(
    r"([0-9]{1,20}),([0-9]{1,10}),([0-9]{1,10}),([0-9]{1,20}),(open|close),([a-z][a-z0-9_.-]{0,31}),"
    r"([a-z_][a-z0-9_.-]{0,31})\Z"
)


HANDED_FD = 9  # the spool's descriptor, locked by the hook that started this worker


def _handed_lock(paths: Paths) -> int | None:
    """The locked spool descriptor the hook handed over, if this is one of its workers."""
    try:
        st, spool = os.fstat(HANDED_FD), os.stat(os.path.join(paths.run, SPOOL))
    except OSError:
        return None
    return HANDED_FD if os.path.samestat(st, spool) else None


def drain_spool(paths: Paths, held: int | None = None) -> None:
    """Take every recorded event, oldest first, under the spool's lock (`held`:
    the hook's, already locked). After letting go, look again: an event the hook
    wrote while this worker held the lock (its hook then started no worker) is
    taken now. One worker at a time."""
    spool = os.path.join(paths.run, SPOOL)
    if held is not None:
        fd = held
    else:
        try:
            fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
    try:
        first = held is not None
        while first or _pending(spool):
            if not first:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # the worker at work sees what is pending when it lets go
            first = False
            try:
                while names := _pending(spool) or _linger(spool):
                    for name in names:
                        critical.checkpoint()
                        _event(paths, spool, name)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


LINGER_SECONDS = 2.0  # a worker waits this long for more events before it exits


def _linger(spool: str) -> list[str]:
    """Logins come in bursts: rather than exit and have the next login start a new
    worker (a Python start each), wait a little, holding the lock, for more."""
    deadline = time.monotonic() + LINGER_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if names := _pending(spool):
            return names
    return []


def _pending(spool: str) -> list[str]:
    """The spool's events, oldest first (the hook's names start with the uptime in
    hundredths of a second; a session's open comes before its close)."""
    found = []
    for name in os.listdir(spool):
        m = EVENT.match(name)
        if m:
            found.append((int(m.group(1)), m.group(5) == "close", name))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(spool, name))  # not an event the hook writes
    return [n for _, _, n in sorted(found)]


def _event(paths: Paths, spool: str, name: str) -> None:
    """One session event. The user is the session leader's loginuid as the hook
    read it from /proc (set by pam_loginuid in the login's own stack, and not the
    user's to change); PAM_USER, which a user can shadow through pam_env, can only
    veto: a session is never counted for someone else."""
    m = EVENT.match(name)
    try:
        if m is None:
            return
        uid, leader, start, event = int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
        service, claimed = m.group(6), m.group(7)
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return
        if claimed == user:
            _count(paths, user, leader, start, event, service)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(spool, name))


def _has_work(paths: Paths, user: str) -> bool:
    """Might a thaw or a logoff act on any of the user's VMs: one with a session
    policy that runs (perhaps paused) or is hibernated? Most logons find none, and
    then start no worker. The worker decides again under each VM's lock."""
    if not os.path.isdir(os.path.join(paths.names, user)):
        return False
    for vm in every.each_vm(paths, user):
        with contextlib.suppress(Exception):
            if registry.read_settings(vm).on_logoff != "none" and _asleep_or_awake(vm):
                return True
    return False


def _asleep_or_awake(vm: registry.VM) -> bool:
    """Runs here (perhaps paused), in a Slurm job on some node, or is hibernated."""
    return jobs.running(vm) or registry.read_saved(vm) is not None


def _count(paths: Paths, user: str, leader: int, start: int, event: str, service: str) -> None:
    try:
        sessions = Sessions(paths, user)
        with sessions.locked():
            _, live = sessions.prune()
            # A logon counts even if it already ended by now (a one-shot `ssh host CMD`
            # under load): its thaw request cancels a pending logoff, as it would have.
            if event == "open":
                sessions.add(leader, start=start)
                action = "thaw" if live == 0 else None
            else:
                sessions.remove(leader)
                action = "logoff" if sessions.prune()[1] == 0 else None
            if action and not _has_work(paths, user):
                action = None  # no VM of theirs to thaw or put to sleep: no worker, no request
            if action:
                _request(paths, user, action)
        if action:
            detach(lambda: work(paths, user))
    except Exception as err:  # noqa: BLE001 - one event never stops the others
        audit.record(
            paths.audit_log, caller=f"pam:{service}", verb=f"pam {event}", owner=user, outcome="error", reason=str(err)
        )


def _work_file(paths: Paths, user: str) -> str:
    return os.path.join(paths.run, "logon-work", user)


def _request(paths: Paths, user: str, action: str) -> None:
    """Leave the newest request for the user's worker (under the session lock),
    with when it was made: a logoff's delay counts from then."""
    os.makedirs(os.path.dirname(_work_file(paths, user)), 0o700, exist_ok=True)
    fd = os.open(_work_file(paths, user), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{action} {time.monotonic():.3f}".encode())
    finally:
        os.close(fd)


def _take(paths: Paths, user: str, keep: bool = False) -> tuple[str, float] | None:
    """The request waiting for the user's worker and when it was made, if any;
    taken unless `keep`."""
    with Sessions(paths, user).locked():
        try:
            fd = os.open(_work_file(paths, user), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            words = os.read(fd, 64).decode(errors="replace").split()
            if not keep:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    try:
        action, at = words[0], float(words[1])
    except (IndexError, ValueError):
        return None
    return (action, at) if action in ("thaw", "logoff") else None


def work(paths: Paths, user: str) -> None:
    """One worker per user at a time, however many logins and logoffs: a worker
    that finds another at work leaves its request to it and exits, and the one at
    work goes on until no request is left. So a VM operation that takes long (or a
    lock held long) never piles up a process per login behind it, and the
    logoff delay is one process waiting, whatever the number of one-shot logins."""
    while True:
        fd = os.open(_work_file(paths, user), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # the worker at work takes this request too
            while (request := _take(paths, user)) is not None:
                action, at = request
                if action == "thaw":
                    apply(paths, user, "thaw")
                else:
                    _logoff(paths, user, at)
        finally:
            os.close(fd)
        if _take(paths, user, keep=True) is None:
            return  # nothing came in between the last look and letting go


def _logoff(paths: Paths, user: str, at: float) -> None:
    """Put each VM with a session policy to sleep once its logoff delay, counted
    from `at`, has passed. A new request (a logon, or a later logoff) ends the wait:
    `work` takes it next. Whether to act is decided again under each VM's lock
    (the owner may be back), so the delay is never the only guard."""
    policy_delay = config.load(paths).logoff_delay_seconds
    pending = []
    for vm in every.each_vm(paths, user):
        with contextlib.suppress(Exception):  # a VM that cannot be read is apply's to report
            s = registry.read_settings(vm)
            if s.on_logoff != "none":
                pending.append((policy_delay if s.logoff_delay is None else s.logoff_delay, vm.identity.name, vm))
    for delay, _, vm in sorted(pending, key=lambda p: (p[0], p[1])):
        while (left := at + delay - time.monotonic()) > 0:
            if _take(paths, user, keep=True) is not None:
                return  # superseded: the newer request decides
            time.sleep(min(left, POLL_SECONDS))
        apply(paths, user, "logoff", only=vm)


POLL_SECONDS = 0.5  # how often a waiting worker looks for a newer request


def apply(paths: Paths, user: str, action: str, only: registry.VM | None = None) -> None:
    """Thaw, or freeze/hibernate per policy, each of user's VMs that has a session
    policy (or just `only`).

    A worker decides on the session count as it is when it acts on each VM, under
    that VM's operation lock (lock order: VM, then the session records), not as
    it was when the worker was spawned: a logoff immediately followed by a logon
    can never leave the VM asleep under a logged-on user, nor awake after they left.
    """
    sessions = Sessions(paths, user)

    def wanted() -> bool:
        return (action == "thaw") == (sessions.live() > 0)

    who = Caller(0, "pam", False)
    for vm in [only] if only is not None else every.each_vm(paths, user):
        critical.checkpoint()
        signal.alarm(WORK_SECONDS)  # bounds each VM's operation, not the waiting in between
        try:
            mode = registry.read_settings(vm).on_logoff
            if mode == "none":
                continue
            if action == "thaw":
                if _asleep_or_awake(vm):
                    resume.thaw(paths, who, vm, wanted)
            else:
                power.sleep(paths, who, vm, mode, wanted)
        except Exception as err:  # noqa: BLE001 - one VM's trouble never stops the others'
            audit.record(
                paths.audit_log,
                caller="pam",
                verb=f"logon {action}",
                vm=vm.identity.name,
                owner=vm.identity.owner,
                outcome="error",
                reason=str(err),
            )
        finally:
            signal.alarm(0)


def tidy_vms(paths: Paths) -> None:
    """Backstops per VM: empty a console log well past the ring's bound (a VM started
    by a release before the console pump writes its log without one; a pump-managed
    log never is), and remove a restored state whose freeing child died."""
    from kvmgate.store import config

    try:
        limit = (config.load(paths).console_log_mib + 1) << 20
    except KvmgateError:
        return
    for vm in every.each_vm(paths):
        with contextlib.suppress(Exception):
            log = vm.sub("log", "console.log")
            if os.stat(log).st_size > limit:
                os.truncate(log, 0)
                print(f"emptied the console log of {vm.identity.owner}/{vm.identity.name}")
        with contextlib.suppress(FileNotFoundError):  # a restored state whose freeing child died (host.migrate)
            os.unlink(vm.sub("saved", "state.discarded"))
            print(f"removed a restored state left in {vm.identity.owner}/{vm.identity.name}")


def reap(paths: Paths) -> None:
    """Prune sessions whose leaders died without closing (crashes, kill -9) and
    hand a logoff (with its delay) to the worker of each user left with none;
    restart a worker that was lost; keep console logs bounded; remove restored
    states a freeing child left.
    Run every minute by kvmgate-reap.timer. Also writes the summaries of
    refusals the audit log held back (host.audit)."""
    audit_rate.flush_held(paths.audit_log)
    drain_spool(paths)  # events whose worker was killed
    from kvmgate.store import define

    for name in define.finish_deletes(paths):  # what earlier deletes left behind
        audit.record(paths.audit_log, caller="reap", verb="admin delete: files removed", vm=name, outcome="ok")
        print(f"removed what a delete left in {name}")
    from kvmgate.store import images

    for name in images.clean_stages(paths):  # image adds, imports and flattenings that died half-way
        audit.record(paths.audit_log, caller="reap", verb="image stage removed", vm=name, outcome="ok")
    tidy_vms(paths)
    root = os.path.join(paths.run, "sessions")
    try:
        users = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for user in users:
        critical.checkpoint()
        try:
            sessions = Sessions(paths, user)
            with sessions.locked():
                logind = sessions.logind()  # a logind session the watcher missed closing
                before, live = sessions.prune(_logind_alive if logind else None)
                crashed = bool(before and not live)
                if crashed:  # the last session ended without closing: a logoff, now
                    _request(paths, user, "logoff")
            if crashed:
                detach(lambda: work(paths, user))  # noqa: B023 - called before the next iteration
                print(f"reaped the sessions of {user}")
        except Exception as err:  # noqa: BLE001 - one user's records never stop the others'
            print(f"kvmgate: reap {user}: {one_line(err)}", file=sys.stderr)
    _restart_lost_workers(paths)


def _restart_lost_workers(paths: Paths) -> None:
    """A request no worker holds (its worker was killed) gets a new worker."""
    with contextlib.suppress(FileNotFoundError):
        for user in sorted(os.listdir(os.path.join(paths.run, "logon-work"))):
            critical.checkpoint()
            with contextlib.suppress(Exception):
                if _take(paths, user, keep=True) is not None and not _at_work(paths, user):
                    detach(lambda: work(paths, user))  # noqa: B023 - called before the next iteration
                    print(f"restarted the logon worker of {user}")


def _at_work(paths: Paths, user: str) -> bool:
    return taken(_work_file(paths, user))


def _logind_alive(sid: str) -> bool:
    from kvmgate.host import logind

    return logind.alive(sid)


SESSION_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")


def sync_logind(paths: Paths) -> list[str]:
    """Bring the session records in line with logind's sessions, and hand each
    user whose first logon began or last logon ended to their worker, as the
    PAM hook does. Returns what was done, a line per user."""
    from kvmgate.host import logind

    services = config.load(paths).logon_services
    current: dict[str, set[str]] = {}
    for s in logind.sessions():
        if logind.counts(s, services) and SESSION_ID.match(s.id):
            with contextlib.suppress(KeyError):
                current.setdefault(pwd.getpwuid(s.uid).pw_name, set()).add(s.id)
    root = os.path.join(paths.run, "sessions")
    with contextlib.suppress(FileNotFoundError):
        for user in os.listdir(root):
            current.setdefault(user, set())
    done = []
    for user, ids in sorted(current.items()):
        critical.checkpoint()
        sessions = Sessions(paths, user)
        if not ids and not os.path.isdir(sessions.dir):
            continue
        action = None
        with sessions.locked():
            old = sessions.logind()
            if old == ids:
                continue
            _, before = sessions.prune(lambda sid: sid in old)  # noqa: B023 - called at once
            sessions.set_logind(ids)
            _, after = sessions.prune(lambda sid: sid in ids)  # noqa: B023 - called at once
            if bool(before) != bool(after) and os.path.isdir(os.path.join(paths.names, user)):
                action = "thaw" if after else "logoff"
                _request(paths, user, action)
        if action:
            detach(lambda: work(paths, user))  # noqa: B023 - called before the next iteration
            done.append(f"{user}: {action}")
    return done


def watch_logind(paths: Paths) -> int:
    """`admin sessions --watch`: follow logind for ever (kvmgate-sessions.service)."""
    import select

    from kvmgate.host import logind

    if not logind.running():
        print("kvmgate: logind does not run here: sessions come from the PAM hook (admin init --pam)")
        return 0
    monitor = logind.Monitor()
    try:
        while True:
            for line in sync_logind(paths):
                audit.record(paths.audit_log, caller="logind", verb="logon session", owner=line.split(":")[0],
                             outcome="ok", action=line.split(": ")[1])  # fmt: skip
            select.select([monitor.fd], [], [], RESYNC_SECONDS)  # a resync now and then, as a backstop
            monitor.flush()
    finally:
        monitor.close()


RESYNC_SECONDS = 30


def sessions_view(req: Request, paths: Paths) -> int:
    """`admin sessions [--json]`: who counts as logged on, and from where."""
    from kvmgate.verbs.common import emit

    rows = []
    with contextlib.suppress(FileNotFoundError):
        for user in sorted(os.listdir(os.path.join(paths.run, "sessions"))):
            live = Sessions(paths, user).records()
            if live:
                rows.append({"user": user, "sessions": live})
    emit(rows, "".join(f"{r['user']:<16} {' '.join(r['sessions'])}\n" for r in rows) or "no sessions\n", req.as_json)
    return 0


def run(req: Request, who: Caller, paths: Paths) -> int:
    """`admin reap`, `admin sessions [--watch]`."""
    if req.verb == "admin-sessions":
        if req.has("--watch"):
            return watch_logind(paths)
        return sessions_view(req, paths)
    reap(paths)
    return 0
