"""The verbs a VM's owner (or root with --owner) may use: start, stop, status, list, console."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import time
from typing import Any

from .. import registry
from ..errors import IdentityError, KvmgateError, NoSuchVM, PermissionRefused, PolicyError, UsageError, WrongState
from ..hostnet import attachments, redirs
from ..paths import Paths
from ..policy.policy import Policy
from ..qmp import QMP, QMPError, wait_ready
from ..translate import Accel, Context, Plan, merge, translate
from . import audit, cgroup, config, launch
from .caller import Caller
from .main import Request, emit

QEMU_GROUP = "kvmgate-qemu"
START_TIMEOUT = 30.0
PAUSED = ("paused", "prelaunch", "suspended", "postmigrate")


def owner_of(req: Request, who: Caller) -> str | None:
    """Whose VMs the request is about: --owner is root's; everyone else acts on their own."""
    owner = req.flag("--owner")
    if owner is not None and not who.is_root and owner != who.name:
        raise PermissionRefused("--owner is for root only")
    return owner if who.is_root else who.name


def target(req: Request, who: Caller, paths: Paths) -> registry.VM:
    return registry.resolve(paths, owner_of(req, who) or who.name, req.name or "")


def plan_for(
    vm: registry.VM,
    policy: Policy,
    user_tokens: list[str],
    accel: Accel,
    paused: bool = False,
    incoming: bool = False,
    settings: dict[str, Any] | None = None,
) -> Plan:
    try:
        admin_opts = policy.parse(list(vm.identity.tokens), "admin")
    except PolicyError as err:
        raise IdentityError(f"{vm.identity.name}: the VM's identity fails validation ({err})") from None
    user_opts = policy.parse(user_tokens, "user")
    default_disk = vm.default_disk if os.path.exists(vm.default_disk) else None
    if settings is None:
        settings = registry.read_settings(vm)
    try:
        uid = pwd.getpwnam(vm.identity.owner).pw_uid
    except KeyError:
        raise NoSuchVM(vm.identity.name) from None
    forwards, nics = attachments(policy.net, settings, uid)
    ctx = Context(
        accel=accel,
        default_disk=default_disk,
        key=vm.key,
        gdb_socket=os.path.join(vm.rundir, "gdb.sock"),
        paused=paused,
        incoming=incoming,
        forwards=forwards,
        nics=nics,
        vnc_socket=vnc_socket(vm) if policy.net.vnc == "unix" else None,
    )
    return translate(merge(admin_opts, user_opts), ctx)


def vnc_dir(vm: registry.VM) -> str:
    """RUN-display/<key>/: the owner's own directory (0700) holding the VNC socket.
    Its parent is root's and cannot be listed."""
    return os.path.join(os.path.dirname(vm.rundir) + "-display", vm.key)


def vnc_socket(vm: registry.VM) -> str:
    return os.path.join(vnc_dir(vm), "vnc.sock")


def _prepare_vnc(vm: registry.VM, plan: Plan, uid: int) -> None:
    d = vnc_dir(vm)
    if os.path.lexists(d):
        import shutil

        shutil.rmtree(d, ignore_errors=True)  # fd-based: safe against links the owner planted
    if "-vnc" not in plan.argv or not any(a.startswith("unix:") for a in plan.argv):
        return
    os.makedirs(os.path.dirname(d), 0o711, exist_ok=True)
    os.chmod(os.path.dirname(d), 0o711)
    os.mkdir(d, 0o700)
    os.chown(d, uid, -1)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _set_vnc_password(paths: Paths, policy: Policy, vm: registry.VM, plan: Plan) -> None:
    """TCP VNC: a fresh random password at every start, readable by root only
    (`kvmgate vnc` shows it to the owner), and the port guarded like a forwarded
    one, so other local users cannot even connect. VNC passwords are 8 characters."""
    spec = next((a for a in plan.argv if a.endswith(",password=on")), None)
    if spec is None:
        return
    password = "".join(_ALPHABET[b % 64] for b in os.urandom(8))  # 48 random bits; no `secrets` import
    with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=5) as q:
        q.execute("change-vnc-password", {"password": password})
    for name, value in (("vnc.password", password), ("vnc.port", str(5900 + int(spec.split(",")[0].rsplit(":")[1])))):
        fd = os.open(os.path.join(vm.rundir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
    if policy.net.ports.protect:
        from . import network

        network.sync(paths, policy)


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "list":
        return do_list(req, who, paths)
    vm = target(req, who, paths)
    if req.verb == "start":
        return start(req, who, paths, vm)
    if req.verb in ("freeze", "thaw", "hibernate"):
        from . import sessions

        return sessions.run(req, who, paths, vm)
    if req.verb == "stop":
        return stop(req, who, paths, vm)
    if req.verb == "status":
        return status(req, vm)
    if req.verb == "console":
        from .console import console

        return console(req, who, vm)
    if req.verb == "ports":
        return ports(req, paths, vm)
    if req.verb == "vnc":
        return vnc(req, vm)
    raise UsageError(f"unknown verb {req.verb}")


# ----------------------------------------------------------------------------- start


def start(req: Request, who: Caller, paths: Paths, vm: registry.VM) -> int:
    """Start the VM, or restore it if it was hibernated."""
    from .hibernate import meta_of, restore

    saved = meta_of(vm) if not registry.is_running(vm) else None
    if saved is not None and req.options:
        raise WrongState(f"{vm.identity.name} is hibernated: it resumes with the options it was started with")
    options = saved.options if saved else req.options
    pid, accel = launch_vm(who, paths, vm, options, paused="--paused" in req.flags, incoming=saved is not None)
    if saved is not None:
        try:
            restore(vm, saved)
        except BaseException:
            _kill(pid)
            registry.cleanup_runtime(vm)
            raise
        audit.done(paths.audit_log, who, "restore", vm.identity.owner, vm.identity.name, size=saved.size)
        print(f"restored {vm.identity.name} (pid {pid}, accel {accel})")
    else:
        print(f"started {vm.identity.name} (pid {pid}, accel {accel})")
    return 0


def launch_vm(
    who: Caller, paths: Paths, vm: registry.VM, options: list[str], paused: bool = False, incoming: bool = False
) -> tuple[int, Accel]:
    policy = config.load(paths)
    try:
        pw = pwd.getpwnam(vm.identity.owner)
    except KeyError:
        raise NoSuchVM(vm.identity.name) from None
    launch.refuse_unless_owner(pw)
    qemu_gid = grp.getgrnam(QEMU_GROUP).gr_gid
    accel = config.accel(policy)
    plan = plan_for(vm, policy, options, accel, paused, incoming)  # all validation before any change
    where = launch.Where(vm.rundir, vm.sub("log"), vm.sub("tmp"))
    launch.check_dirs(plan, pw, qemu_gid)
    fds = launch.open_user_resources(plan, pw, qemu_gid, where.tmpdir)  # the last refusals
    try:
        # Bridged NICs and protected ports need the host's networks and rules: after a
        # reboot, the first such start brings them back (cheap when they are up).
        if any(r.bridge for r in plan.resources) or "hostfwd=" in " ".join(plan.argv):
            from . import network

            network.ensure_up(paths, policy)
            network.attach_taps(paths, policy, plan.resources)
    except BaseException:
        launch.close_all(fds)  # the taps vanish with their last descriptor
        raise
    try:
        lock_fd = registry.lock(vm)
    except BaseException:
        launch.close_all(fds)
        raise
    try:
        fds |= launch.open_runtime_resources(plan, where, lock_fd)
        _prepare_vnc(vm, plan, pw.pw_uid)
        limit = (plan.memory_mib + policy.memory_overhead_mib) << 20
        procs = cgroup.setup(vm.key, limit)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fds[-1] = log = os.open(vm.sub("log", "qemu.log"), flags, 0o600)
        argv = [policy.qemu, *plan.argv]
        audit.done(paths.audit_log, who, "start", vm.identity.owner, vm.identity.name, options=options, argv=argv)
        qemu_fds = {t: f for t, f in fds.items() if t >= 0}
        pid = launch.spawn(policy.qemu, plan, qemu_fds, pw, qemu_gid, where, procs, log, policy.max_open_files)
    finally:
        launch.close_all(fds)
        os.close(lock_fd)  # QEMU holds its own copy of the lock from here on

    def alive() -> bool:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)

    try:
        wait_ready(os.path.join(vm.rundir, "qmp.sock"), time.monotonic() + START_TIMEOUT, alive)
    except QMPError as err:
        reason = _log_tail(vm.sub("log", "qemu.log")) or str(err)
        _kill(pid)
        raise KvmgateError(f"QEMU failed to start: {reason}") from None
    try:
        _set_vnc_password(paths, policy, vm, plan)
    except (OSError, QMPError) as err:
        _kill(pid)
        raise KvmgateError(f"cannot set the VNC password: {err}") from None
    registry.write_pid(vm, pid)
    registry.write_options(vm, options)
    registry.take_intended_exit(vm)  # a stale mark from an earlier run must not hide a crash
    for extra in plan.pidfiles:
        _write_admin_pidfile(extra, pid)
    return pid, accel


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
        registry.mark_intended_exit(vm)
        with QMP(qmp_path, timeout=5) as q:
            if "--force" in req.flags:
                q.execute("quit")
                how = "quit"
            else:
                q.execute("system_powerdown")
                how = "powered down"
    except (OSError, QMPError):
        pass
    stopped = registry.wait_stopped(vm, 5 if how == "quit" else timeout)
    if not stopped:
        pid = registry.read_pid(vm)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        how = "killed after timeout"
        stopped = registry.wait_stopped(vm, 10)
    if not stopped:
        raise KvmgateError(f"{vm.identity.name} did not stop")
    registry.cleanup_runtime(vm)
    cgroup.remove(vm.key)
    audit.done(paths.audit_log, who, "stop", vm.identity.owner, vm.identity.name, how=how)
    print(f"stopped {vm.identity.name} ({how})")
    return 0


# ---------------------------------------------------------------------------- status


def describe(vm: registry.VM) -> dict[str, Any]:
    from .hibernate import meta_of

    running = registry.is_running(vm)
    saved = None if running else meta_of(vm)
    info: dict[str, Any] = {
        "name": vm.identity.name,
        "owner": vm.identity.owner,
        "state": "running" if running else "hibernated" if saved else "stopped",
        "directory": vm.vmdir,
        "key": vm.key,
    }
    if saved:
        info["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved.saved_at))
        info["saved_bytes"] = saved.size
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


def _addresses(vm: registry.VM) -> list[dict[str, Any]]:
    """The VM's NICs on named networks: what users need to reach it (and service VMs)."""
    return [{"network": n["network"], "mac": n["mac"], "ip": n["ip"]} for n in registry.read_settings(vm)["nics"]]


def status(req: Request, vm: registry.VM) -> int:
    info = describe(vm)
    info["networks"] = _addresses(vm)
    text = "".join(f"{k}: {v}\n" for k, v in info.items() if k != "networks")
    text += "".join(f"network: {a['network']} mac {a['mac']} ip {a['ip'] or '-'}\n" for a in info["networks"])
    emit(info, text, "--json" in req.flags)
    return 0


def do_list(req: Request, who: Caller, paths: Paths) -> int:
    if "--services" in req.flags:
        return list_services(req, paths)
    owner = owner_of(req, who)
    rows = []
    for o, n in registry.list_names(paths, owner):
        try:
            vm = registry.resolve(paths, o, n)
        except KvmgateError:
            continue
        rows.append({"name": n, "owner": o, "state": describe(vm)["state"]})
    text = "".join(f"{r['owner']:<16} {r['name']:<32} {r['state']}\n" for r in rows)
    emit(rows, text, "--json" in req.flags)
    return 0


def list_services(req: Request, paths: Paths) -> int:
    """Service VMs, for everyone to see (their name and state, nothing to control)."""
    rows = []
    for o, n in registry.list_names(paths):
        try:
            vm = registry.resolve(paths, o, n)
            if registry.read_settings(vm)["service"]:
                addresses = [a for a in _addresses(vm) if a["ip"]]
                rows.append({"name": n, "owner": o, "state": describe(vm)["state"], "addresses": addresses})
        except KvmgateError:
            continue
    text = "".join(
        f"{r['name']:<32} {r['state']:<11} " + " ".join(f"{a['network']}:{a['ip']}" for a in r["addresses"]) + "\n"
        for r in rows
    )
    emit(rows, text, "--json" in req.flags)
    return 0


# --------------------------------------------------------------------- ports and vnc


def forwarded(policy: Policy, vm: registry.VM) -> list[dict[str, Any]]:
    """The VM's host ports: `--forward`s (through kvmgate-gated when it wakes the VM)
    and the note's `-redir`s."""
    s = registry.read_settings(vm)
    rows: list[dict[str, Any]] = [
        {
            "service": f["service"],
            "guest_port": f["guest"],
            "host": policy.net.ports.bind,
            "port": f["port"],
            "via": "kvmgate-gated" if f["internal"] else "qemu",
        }
        for f in s["forwards"]
    ]
    rows += [
        {
            "service": f"redir-{r.proto}",
            "guest_port": r.guest_port,
            "host": "127.0.0.1",
            "port": r.host_port,
            "via": "qemu",
        }
        for r in redirs(vm.identity.tokens)
    ]
    return rows


def ports(req: Request, paths: Paths, vm: registry.VM) -> int:
    rows = forwarded(config.load(paths), vm)
    text = "".join(
        f"{r['service']:<12} {r['host']}:{r['port']} -> guest:{r['guest_port']} ({r['via']})\n" for r in rows
    )
    emit(rows, text or f"{vm.identity.name} has no forwarded ports\n", "--json" in req.flags)
    return 0


def vnc(req: Request, vm: registry.VM) -> int:
    """How the owner reaches the VM's display; nothing listens on a public address."""
    if not registry.is_running(vm):
        raise WrongState(f"{vm.identity.name} is not running")
    argv = _running_argv(vm)
    spec = next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-vnc"), None)
    if spec is None:
        raise WrongState(f"{vm.identity.name} was started without -vnc")
    host = socket.gethostname()
    if spec.startswith("unix:"):
        path = spec[5:]
        info: dict[str, Any] = {
            "kind": "unix",
            "socket": path,
            "tunnel": f"ssh -N -L 5900:{path} {vm.identity.owner}@{host}",
            "viewer": "vncviewer localhost:5900 (after the tunnel)",
        }
    else:
        hostport = spec.split(",", 1)[0]
        port = 5900 + int(hostport.rsplit(":", 1)[1])
        with open(os.path.join(vm.rundir, "vnc.password")) as f:
            password = f.read().strip()
        info = {
            "kind": "tcp",
            "host": "127.0.0.1",
            "port": port,
            "password": password,
            "tunnel": f"ssh -N -L {port}:127.0.0.1:{port} {vm.identity.owner}@{host}",
            "viewer": f"vncviewer 127.0.0.1::{port}",
        }
    emit(info, "".join(f"{k}: {v}\n" for k, v in info.items()), "--json" in req.flags)
    return 0


def _running_argv(vm: registry.VM) -> list[str]:
    pid = registry.read_pid(vm)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")]
