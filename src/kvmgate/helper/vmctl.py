"""The verbs a VM's owner (or root with --owner) may use: start, stop, status, list, console."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import re
import select
import signal
import socket
import sys
import time
from typing import Any

from .. import registry
from ..errors import IdentityError, KvmgateError, NoSuchVM, PermissionRefused, PolicyError, UsageError, WrongState
from ..paths import Paths
from ..policy.policy import Policy
from ..qmp import QMP, QMPError, wait_ready
from ..translate import Accel, Context, Plan, merge, translate
from . import audit, cgroup, config, launch
from .caller import Caller, drop_to
from .main import Request, emit

QEMU_GROUP = "kvmgate-qemu"
START_TIMEOUT = 30.0
DETACH = b"\x1d"  # Ctrl-]
PAUSED = ("paused", "prelaunch", "suspended")


def target(req: Request, who: Caller, paths: Paths) -> registry.VM:
    owner = req.flag("--owner")
    if owner is not None and not who.is_root and owner != who.name:
        raise PermissionRefused("--owner is for root only")
    return registry.resolve(paths, owner or who.name, req.name or "")


def plan_for(vm: registry.VM, policy: Policy, user_tokens: list[str], accel: Accel, paused: bool = False) -> Plan:
    try:
        admin_opts = policy.parse(list(vm.identity.tokens), "admin")
    except PolicyError as err:
        raise IdentityError(f"{vm.identity.name}: the VM's identity fails validation ({err})") from None
    user_opts = policy.parse(user_tokens, "user")
    default_disk = vm.default_disk if os.path.exists(vm.default_disk) else None
    ctx = Context(
        accel=accel,
        default_disk=default_disk,
        key=vm.key,
        gdb_socket=os.path.join(vm.rundir, "gdb.sock"),
        paused=paused,
    )
    return translate(merge(admin_opts, user_opts), ctx)


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "list":
        return do_list(req, who, paths)
    vm = target(req, who, paths)
    if req.verb == "start":
        return start(req, who, paths, vm)
    if req.verb == "stop":
        return stop(req, who, paths, vm)
    if req.verb == "status":
        return status(req, vm)
    if req.verb == "console":
        return console(req, who, vm)
    raise UsageError(f"unknown verb {req.verb}")


# ----------------------------------------------------------------------------- start


def start(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    policy = config.load(paths)
    try:
        pw = pwd.getpwnam(vm.identity.owner)
    except KeyError:
        raise NoSuchVM(vm.identity.name) from None
    launch.refuse_unless_owner(pw)
    qemu_gid = grp.getgrnam(QEMU_GROUP).gr_gid
    accel = config.accel(policy)
    plan = plan_for(vm, policy, req.options, accel, "--paused" in req.flags)  # all validation before any change
    lock_fd = registry.lock(vm)
    try:
        where = launch.Where(vm.rundir, vm.sub("log"), vm.sub("tmp"), lock_fd)
        fds = launch.open_resources(plan, pw, qemu_gid, where)
        limit = (plan.memory_mib + policy.memory_overhead_mib) << 20
        procs = cgroup.setup(vm.key, limit)
        log = os.open(
            vm.sub("log", "qemu.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        argv = [policy.qemu, *plan.argv]
        audit.record(
            paths.audit_log,
            caller=who.name,
            uid=who.uid,
            verb="start",
            vm=vm.identity.name,
            owner=vm.identity.owner,
            options=req.options,
            outcome="ok",
            argv=argv,
        )
        pid = launch.spawn(policy.qemu, plan, fds, pw, qemu_gid, where, procs, log, policy.max_open_files)
        for fd in {*fds.values(), log} - {lock_fd}:
            os.close(fd)
    finally:
        os.close(lock_fd)  # QEMU holds its own copy of the lock from here on

    def alive() -> bool:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)

    try:
        wait_ready(os.path.join(vm.rundir, "qmp.sock"), time.monotonic() + START_TIMEOUT, alive)
    except QMPError as err:
        reason = _log_tail(vm.sub("log", "qemu.log")) or str(err)
        _kill(pid)
        raise KvmgateError(f"QEMU failed to start: {reason}") from None
    registry.write_pid(vm, pid)
    for extra in plan.pidfiles:
        _write_admin_pidfile(extra, pid)
    print(f"started {vm.identity.name} (pid {pid}, accel {accel})")
    return 0


def _write_admin_pidfile(path: str, pid: int) -> None:
    parent = os.stat(os.path.dirname(path) or "/")
    if parent.st_uid != 0 or parent.st_mode & 0o022:
        raise PermissionRefused(f"-pidfile: {os.path.dirname(path)} must be a root-owned directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.write(fd, f"{pid}\n".encode())
    os.close(fd)


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [ln.strip() for ln in f.read()[-4096:].decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# ------------------------------------------------------------------------------ stop


def _wait_stopped(vm: registry.VM, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not registry.is_running(vm):
            return True
        time.sleep(0.05)
    return not registry.is_running(vm)


def stop(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    if not registry.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    policy = config.load(paths)
    t = req.flag("--timeout")
    if t is not None and not (t.isdigit() and 0 <= int(t) <= 3600):
        raise UsageError("--timeout must be seconds between 0 and 3600")
    timeout = float(t) if t is not None else float(policy.stop_timeout)
    how = "killed"
    qmp_path = os.path.join(vm.rundir, "qmp.sock")
    try:
        with QMP(qmp_path, timeout=5) as q:
            if "--force" in req.flags:
                q.execute("quit")
                how = "quit"
            else:
                q.execute("system_powerdown")
                how = "powered down"
    except (OSError, QMPError):
        pass
    stopped = _wait_stopped(vm, 5 if how == "quit" else timeout)
    if not stopped:
        pid = registry.read_pid(vm)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        how = "killed after timeout"
        stopped = _wait_stopped(vm, 10)
    if not stopped:
        raise KvmgateError(f"{vm.identity.name} did not stop")
    registry.cleanup_runtime(vm)
    cgroup.remove(vm.key)
    audit.record(
        paths.audit_log,
        caller=who.name,
        uid=who.uid,
        verb="stop",
        vm=vm.identity.name,
        owner=vm.identity.owner,
        outcome="ok",
        how=how,
    )
    print(f"stopped {vm.identity.name} ({how})")
    return 0


# ---------------------------------------------------------------------------- status


def describe(vm: registry.VM) -> dict[str, Any]:
    running = registry.is_running(vm)
    info: dict[str, Any] = {
        "name": vm.identity.name,
        "owner": vm.identity.owner,
        "state": "running" if running else "stopped",
        "directory": vm.vmdir,
        "key": vm.key,
    }
    if running:
        info["pid"] = registry.read_pid(vm)
        try:
            with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=2) as q:
                info["qemu_status"] = q.execute("query-status").get("status")
        except (OSError, QMPError):
            info["qemu_status"] = "unknown"
        if info["qemu_status"] in PAUSED:
            info["state"] = "paused"
    return info


def status(req: Request, vm: registry.VM) -> int:
    info = describe(vm)
    text = "".join(f"{k}: {v}\n" for k, v in info.items())
    emit(info, text, "--json" in req.flags)
    return 0


def do_list(req: Request, who: Caller, paths: Paths) -> int:
    owner = req.flag("--owner")
    if owner is not None and not who.is_root and owner != who.name:
        raise PermissionRefused("--owner is for root only")
    if not who.is_root:
        owner = who.name
    rows = []
    for o, n in registry.list_names(paths, owner):
        try:
            vm = registry.resolve(paths, o, n)
        except KvmgateError:
            continue
        rows.append({"name": n, "owner": o, "state": "running" if registry.is_running(vm) else "stopped"})
    text = "".join(f"{r['owner']:<16} {r['name']:<32} {r['state']}\n" for r in rows)
    emit(rows, text, "--json" in req.flags)
    return 0


# --------------------------------------------------------------------------- console


def console(req: Request, who: Caller, vm: registry.VM) -> int:
    """Attach to the serial console. One attachment at a time (a lock), the
    console log's tail first as scrollback, then live. Detach with Ctrl-].
    The connection is made as root; the relay itself runs as the caller."""
    expect = req.flag("--expect")
    t = req.flag("--timeout")
    if t is not None and not (t.isdigit() and int(t) <= 86400):
        raise UsageError("--timeout must be whole seconds")
    pattern = None
    if expect is not None:
        try:
            pattern = re.compile(expect.encode())
        except re.error as err:
            raise UsageError(f"--expect: {err}") from None
    if not registry.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    lock = os.open(
        os.path.join(vm.rundir, "console.lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WrongState(f"{vm.identity.name}: the console is already attached elsewhere") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.path.join(vm.rundir, "console.sock"))
    except OSError:
        raise WrongState(f"{vm.identity.name} has no serial console") from None
    try:
        with open(vm.sub("log", "console.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            scrollback = f.read()
    except OSError:
        scrollback = b""
    if not who.is_root:
        pw = pwd.getpwuid(who.uid)
        drop_to(pw.pw_uid, pw.pw_gid)
    deadline = time.monotonic() + float(t) if t is not None else None
    return _relay(sock, scrollback, pattern, deadline)


def _relay(sock: socket.socket, scrollback: bytes, pattern: re.Pattern[bytes] | None, deadline: float | None) -> int:
    out = sys.stdout.buffer
    seen = scrollback
    out.write(scrollback)
    out.flush()
    if pattern is not None and pattern.search(seen):
        return 0
    interactive = pattern is None and os.isatty(0)
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(0)
        tty.setraw(0)
        sys.stderr.write("[kvmgate: attached; detach with Ctrl-]]\r\n")
    try:
        watch: list[Any] = [sock, 0]
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if pattern is not None:
                    raise KvmgateError("console: timed out waiting for the expected output")
                return 0
            ready, _, _ = select.select(watch, [], [], wait)
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return 0
                out.write(data)
                out.flush()
                if pattern is not None:
                    seen = (seen + data)[-65536:]
                    if pattern.search(seen):
                        return 0
            if 0 in ready:
                data = os.read(0, 4096)
                if not data:
                    watch.remove(0)
                    continue
                if interactive and DETACH in data:
                    data = data.split(DETACH, 1)[0]
                    if data:
                        sock.sendall(data)
                    return 0
                sock.sendall(data)
    except OSError as err:
        if err.errno == errno.EPIPE:
            return 0
        raise
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\n[kvmgate: detached]\n")
