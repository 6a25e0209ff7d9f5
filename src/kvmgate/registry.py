"""The VM registry on disk: identity directories, name symlinks, runtime directories.

Layout (see docs/layout.md):

    STATE/vms/                 root 0711   nobody may list it
    STATE/vms/<identity>/      root 0711   created and renamed by root only
        id/<chunk>/...         root 0700   continuation of a long identity
        disks/                 OWNER 0700  the owner's images (disk0.qcow2)
        saved/                 root 0700   saved states
        log/                   root 0700   qemu.log, console.log
        tmp/                   OWNER 0700  QEMU's private TMPDIR
    STATE/names/<owner>/<name> -> ../../vms/<identity>    (root 0700 dirs)
    RUN/<key>/                 root 0700   qmp.sock, console.sock, lock, pid

The symlink is only a name: the identity it points at is decoded and must
name the same owner and name, so a swapped link cannot borrow another VM.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import time
from typing import Any, NamedTuple

from . import identity as ident
from .errors import IdentityError, KvmgateError, NoSuchVM, UsageError, WrongState
from .paths import Paths
from .regex import Regex

DEFAULT_DISK = "disk0.qcow2"


class VM(NamedTuple):
    identity: ident.Identity
    vmdir: str
    rundir: str

    @property
    def key(self) -> str:
        return self.identity.key

    def sub(self, *parts: str) -> str:
        return os.path.join(self.vmdir, *parts)

    @property
    def default_disk(self) -> str:
        return self.sub("disks", DEFAULT_DISK)


def _mkdir(path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise KvmgateError(f"{path} exists and is not a directory") from None
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def ensure_layout(paths: Paths) -> None:
    for path, mode in (
        (paths.state, 0o755),
        (paths.vms, 0o711),
        (paths.names, 0o700),
        (os.path.join(paths.state, "kept"), 0o711),
        (paths.run, 0o700),
        (paths.log, 0o700),
    ):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        _mkdir(path, mode)


def _check_root_dir(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise IdentityError(f"{path} is not a root-owned directory")


def vm_for(paths: Paths, identity: ident.Identity) -> VM:
    return VM(identity, os.path.join(paths.vms, identity.components()[0]), os.path.join(paths.run, identity.key))


def _read_chain(vmdir: str) -> list[str]:
    chain: list[str] = []
    cur = os.path.join(vmdir, ident.CHAIN_DIR)
    while True:
        try:
            entries = os.listdir(cur)
        except FileNotFoundError:
            return chain
        if not entries:
            return chain
        if len(entries) != 1:
            raise IdentityError("identity chain is ambiguous")
        cur = os.path.join(cur, entries[0])
        _check_root_dir(cur)
        chain.append(entries[0])


def decode_dir(paths: Paths, dirname: str) -> VM:
    """Decode a VM directory's identity from its name (and chain) alone."""
    vmdir = os.path.join(paths.vms, dirname)
    _check_root_dir(vmdir)
    chain = _read_chain(vmdir) if dirname.startswith(ident.LONG) else []
    identity = ident.decode([dirname, *chain])
    return VM(identity, vmdir, os.path.join(paths.run, identity.key))


def resolve(paths: Paths, owner: str, name: str) -> VM:
    """The VM `name` of `owner`. Missing, foreign and tampered all raise NoSuchVM
    for the caller; a tampered identity is also logged by the caller as refused."""
    try:
        ident.check_name(name)
        ident.check_owner(owner)
    except UsageError:
        raise NoSuchVM(name) from None
    link = os.path.join(paths.names, owner, name)
    try:
        target = os.readlink(link)
    except OSError:
        raise NoSuchVM(name) from None
    prefix = "../../vms/"
    dirname = target[len(prefix) :]
    if not target.startswith(prefix) or "/" in dirname or dirname in ("", ".", ".."):
        raise IdentityError(f"name link {owner}/{name} is malformed")
    try:
        vm = decode_dir(paths, dirname)
    except FileNotFoundError:
        raise NoSuchVM(name) from None
    if (vm.identity.owner, vm.identity.name) != (owner, name):
        raise IdentityError(f"name link {owner}/{name} points at another VM's identity")
    return vm


def list_names(paths: Paths, owner: str | None = None) -> list[tuple[str, str]]:
    owners = [owner] if owner else sorted(os.listdir(paths.names))
    out = []
    for o in owners:
        try:
            out += [(o, n) for n in sorted(os.listdir(os.path.join(paths.names, o)))]
        except FileNotFoundError:
            continue
    return out


# ------------------------------------------------------------------ runtime state


def is_running(vm: VM) -> bool:
    """QEMU itself holds the lock for its whole life, so the lock is the liveness."""
    try:
        fd = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_stopped(vm: VM, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_running(vm):
            return True
        time.sleep(0.01)
    return not is_running(vm)


def lock(vm: VM) -> int:
    """Take the VM's exclusive lock, or raise WrongState: exactly one start wins."""
    _mkdir(vm.rundir, 0o700)
    fd = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WrongState(f"{vm.identity.name} is already running") from None
    return fd


def read_pid(vm: VM) -> int | None:
    """The QEMU pid, if the recorded process is still the one we started."""
    try:
        with open(os.path.join(vm.rundir, "pid")) as f:
            pid_s, start_s = f.read().split()
        pid = int(pid_s)
        if process_start(pid) == int(start_s):
            return pid
    except (OSError, ValueError):
        pass
    return None


def write_options(vm: VM, options: list[str]) -> None:
    """The user options of the running QEMU: a hibernate records them, so the
    restored VM gets exactly the same devices."""
    import json

    tmp = os.path.join(vm.rundir, "options.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(options, f)
    os.replace(tmp, os.path.join(vm.rundir, "options.json"))


def read_options(vm: VM) -> list[str]:
    import json

    with open(os.path.join(vm.rundir, "options.json")) as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise KvmgateError("corrupt options record")
    return data


def process_start(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def write_pid(vm: VM, pid: int) -> None:
    tmp = os.path.join(vm.rundir, "pid.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid} {process_start(pid)}\n")
    os.replace(tmp, os.path.join(vm.rundir, "pid"))


# ------------------------------------------------------------------ admin changes


def create(
    paths: Paths, identity: ident.Identity, empty_image: bytes | None, settings: dict[str, Any] | None = None
) -> VM:
    """Build the VM directory under a temporary name, then publish it with one
    rename and one exclusive symlink: a failure leaves nothing behind."""
    pw = pwd.getpwnam(identity.owner)
    vm = vm_for(paths, identity)
    link_dir = os.path.join(paths.names, identity.owner)
    link = os.path.join(link_dir, identity.name)
    if os.path.lexists(link):
        raise WrongState(f"{identity.owner} already has a VM named {identity.name}")
    if os.path.lexists(vm.vmdir):
        raise WrongState(f"identity directory already exists: {vm.vmdir}")
    import shutil

    stage = os.path.join(paths.vms, f".new-{os.getpid()}-{time.monotonic_ns()}")
    _mkdir(stage, 0o700)
    try:
        comps = identity.components()
        if len(comps) > 1:
            cur = os.path.join(stage, ident.CHAIN_DIR)
            _mkdir(cur, 0o700)
            for c in comps[1:]:
                cur = os.path.join(cur, c)
                _mkdir(cur, 0o700)
        _mkdir(os.path.join(stage, "saved"), 0o700)
        _mkdir(os.path.join(stage, "log"), 0o700)
        _mkdir(os.path.join(stage, "disks"), 0o700)
        _mkdir(os.path.join(stage, "tmp"), 0o700)
        if settings is not None:
            _write_settings_in(stage, settings)
        if empty_image is not None:
            fd = os.open(
                os.path.join(stage, "disks", DEFAULT_DISK),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, empty_image)
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
            finally:
                os.close(fd)
        # Ownership last: until here only root could touch anything inside.
        os.chown(os.path.join(stage, "disks"), pw.pw_uid, pw.pw_gid)
        os.chown(os.path.join(stage, "tmp"), pw.pw_uid, pw.pw_gid)
        os.chmod(stage, 0o711)
        os.rename(stage, vm.vmdir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        _mkdir(link_dir, 0o700)
        os.symlink("../../vms/" + comps[0], link)
    except BaseException:
        shutil.rmtree(vm.vmdir, ignore_errors=True)
        raise
    return vm


def delete(paths: Paths, vm: VM, keep_disks: bool) -> str | None:
    import shutil

    if is_running(vm):
        raise WrongState(f"{vm.identity.name} is running; stop it first")
    os.unlink(os.path.join(paths.names, vm.identity.owner, vm.identity.name))
    kept = None
    if keep_disks:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        owner_dir = os.path.join(paths.state, "kept", vm.identity.owner)
        _mkdir(owner_dir, 0o711)
        kept = os.path.join(owner_dir, f"{vm.identity.name}.{stamp}")
        os.rename(vm.sub("disks"), kept)
    trash = os.path.join(paths.vms, f".del-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(vm.vmdir, trash)
    shutil.rmtree(trash)
    shutil.rmtree(vm.rundir, ignore_errors=True)
    return kept


ON_LOGOFF = ("none", "pause", "hibernate")


DEFAULT_SETTINGS: dict[str, Any] = {
    "on_logoff": "none",
    "service": False,
    "autostart": False,
    "wake": False,  # kvmgate-gated owns the forwarded ports and wakes the VM on a connection
    "idle": 0,
    "forwards": [],  # [{"service", "guest", "port", "internal"}]: host port -> guest TCP port
    "nics": [],  # [{"network", "mac", "tap", "ip"}]: NICs on the admin's named networks
}


def read_settings(vm: VM) -> dict[str, Any]:
    """Admin settings that are not QEMU options (session policy, service VM, ports,
    networks), in a root-only file of the VM directory."""
    import json

    try:
        with open(vm.sub("settings.json")) as f:
            data = json.load(f)
    except FileNotFoundError:
        return dict(DEFAULT_SETTINGS)
    if (
        not isinstance(data, dict)
        or set(data) - set(DEFAULT_SETTINGS)
        or data.get("on_logoff", "none") not in ON_LOGOFF
        or not all(isinstance(data.get(k, False), bool) for k in ("service", "autostart", "wake"))
        or not isinstance(data.get("idle", 0), int)
        or not _valid_rows(data.get("forwards", []), _FORWARD)
        or not _valid_rows(data.get("nics", []), _NIC)
    ):
        raise KvmgateError(f"{vm.identity.name}: corrupt settings")
    return {**DEFAULT_SETTINGS, **data}


def _port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def _match(pattern: str) -> Any:
    rx = Regex(pattern)  # compiled on first use: most helper runs never read a NIC
    return lambda v: isinstance(v, str) and rx.fullmatch(v) is not None


# Values that reach `ip -batch`, the nftables ruleset and dnsmasq: strict shapes, so
# even a damaged settings file can never smuggle a command or a rule into them.
_IFNAME = _match(r"[a-z][a-z0-9]{0,14}")
_NIC = {
    "network": _match(r"[a-z][a-z0-9]{0,15}"),
    "mac": _match(r"52:54:00(:[0-9a-f]{2}){3}"),
    "tap": lambda v: v is None or _IFNAME(v),
    "ip": lambda v: v is None or _match(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")(v),
}
_FORWARD = {
    "service": _match(r"[a-z][a-z0-9-]{0,15}"),
    "guest": _port,
    "port": _port,
    "internal": lambda v: v is None or _port(v),
}


def _valid_rows(rows: Any, schema: dict[str, Any]) -> bool:
    return isinstance(rows, list) and all(
        isinstance(r, dict) and set(r) == set(schema) and all(check(r[k]) for k, check in schema.items()) for r in rows
    )


def all_settings(paths: Paths) -> list[tuple[VM, dict[str, Any]]]:
    """Every VM with its settings: what allocations are checked against. A VM that
    does not resolve is skipped (its allocations are freed with it)."""
    out = []
    for owner, name in list_names(paths):
        try:
            vm = resolve(paths, owner, name)
            out.append((vm, read_settings(vm)))
        except KvmgateError:
            continue
    return out


def write_settings(vm: VM, settings: dict[str, Any]) -> None:
    _write_settings_in(vm.vmdir, settings)


def _write_settings_in(vmdir: str, settings: dict[str, Any]) -> None:
    import json

    if settings.get("on_logoff", "none") not in ON_LOGOFF:
        raise UsageError("--on-logoff must be none, pause or hibernate")
    tmp = os.path.join(vmdir, "settings.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f)
    os.replace(tmp, os.path.join(vmdir, "settings.json"))


def mark_intended_exit(vm: VM) -> None:
    """kvmgate is about to end QEMU on purpose: a watcher must not restart it."""
    os.close(os.open(os.path.join(vm.rundir, "intended-exit"), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def take_intended_exit(vm: VM) -> bool:
    try:
        os.unlink(os.path.join(vm.rundir, "intended-exit"))
        return True
    except FileNotFoundError:
        return False


def wait_exit(vm: VM) -> None:
    """Block until QEMU (which holds the VM's lock for its whole life) exits."""
    fd = os.open(os.path.join(vm.rundir, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def cleanup_runtime(vm: VM) -> None:
    for name in ("qmp.sock", "console.sock", "pid", "options.json", "vnc.password", "vnc.port"):
        try:
            os.unlink(os.path.join(vm.rundir, name))
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
