"""What only some starts need, kept off the plain start path: the record
`kvmgate vnc` reads (and TCP VNC's fresh password), and the admin's -pidfile."""

from __future__ import annotations

import os

from kvmgate.errors import PermissionRefused
from kvmgate.host.qmp import QMP
from kvmgate.model.policy.policy import Policy
from kvmgate.model.translate import Plan
from kvmgate.paths import Paths
from kvmgate.store import display, registry

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def record(paths: Paths, policy: Policy, vm: registry.VM, plan: Plan) -> None:
    """What `kvmgate vnc` shows the owner, from the plan, never
    from QEMU's command line. TCP VNC gets a fresh random password at every start
    (VNC passwords are 8 characters), and its port is guarded like a forwarded one."""
    record: dict[str, object] = {}
    if plan.vnc is not None and plan.vnc.mode == "unix":
        record["vnc"] = {"kind": "unix", "socket": plan.vnc.socket}
    elif plan.vnc is not None:
        password = "".join(_ALPHABET[b % 64] for b in os.urandom(8))  # 48 random bits; no `secrets` import
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=5) as q:
            q.execute("change-vnc-password", {"password": password})
        record["vnc"] = {"kind": "tcp", "port": plan.vnc.port, "password": password}
    if record:
        display.write_display(vm, record)
    if plan.vnc is not None and plan.vnc.mode == "tcp" and policy.net.ports.protect:
        from kvmgate.host import network

        network.sync(paths, policy)


def write_admin_pidfiles(paths: tuple[str, ...], pid: int) -> None:
    """The admin's -pidfile options, in root-owned directories only."""
    for path in paths:
        _write_admin_pidfile(path, pid)


def _write_admin_pidfile(path: str, pid: int) -> None:
    parent = os.stat(os.path.dirname(path) or "/")
    if parent.st_uid != 0 or parent.st_mode & 0o022:
        raise PermissionRefused(f"-pidfile: {os.path.dirname(path)} must be a root-owned directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.write(fd, f"{pid}\n".encode())
    os.close(fd)


def make_socket_dir(d: str, uid: int) -> None:
    """A fresh owner directory for this run's VNC socket, which QEMU (running as
    the owner) creates in it: made by root, then given to the owner."""
    parent = os.path.dirname(d)
    os.makedirs(parent, 0o711, exist_ok=True)
    os.chmod(parent, 0o711)
    os.mkdir(d, 0o700)
    os.chown(d, uid, -1)
