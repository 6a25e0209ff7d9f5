"""Start one VM, or restore it if it was hibernated: the start path.

Every public function of `ops.lifecycle` and `ops.power` takes the VM's
operation lock, then looks at the VM's state, then acts: two actors on one VM
(a user's thaw and the PAM worker's hibernate, three parallel hibernates, ...)
run one after the other, and the second sees what the first did. Functions
ending in `_locked` assume the caller holds the lock. Stopping, freezing,
thawing and hibernating live in `ops.power`, off the start path.
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from kvmgate.errors import FileRefused, KvmgateError, NoSuchVM, QemuRefused, QMPError, WrongState
from kvmgate.host import audit, cgroup, launch
from kvmgate.host.caller import Caller
from kvmgate.host.qmp import QMP, wait_ready
from kvmgate.model.policy.grammar import Limits
from kvmgate.model.policy.policy import Policy
from kvmgate.model.translate import Accel, Plan
from kvmgate.ops.plan import owner_dir, owner_pw, plan_for
from kvmgate.paths import Paths
from kvmgate.store import config, critical, locks, registry, runs, runtime

START_TIMEOUT = 30.0
# Set by a running-memory budget (ops.pressure) around a start: called with the
# planned memory after the last refusal and before anything changes.
ROOM: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("room", default=None)
ON_NODE = contextvars.ContextVar("on_node", default=False)  # the Slurm backend's node side (ops.cluster) starts here


class Started(NamedTuple):
    pid: int
    accel: Accel
    restored: bool
    node: str | None = None  # the Slurm backend: where it runs, and its job
    job: int | None = None


@contextlib.contextmanager
def lock(paths: Paths, who: Caller, vm: registry.VM) -> Iterator[None]:
    """The VM's operation lock, then the VM resolved again: a delete (and a
    re-create under the same name) while this caller waited is seen as gone."""
    wait = locks.WAIT if who.via_sudo else locks.INTERNAL_WAIT
    with locks.vm_lock(paths, vm.identity.owner, vm.identity.name, wait):
        again = registry.resolve(paths, vm.identity.owner, vm.identity.name)
        if again.key != vm.key or again.vmdir != vm.vmdir:
            raise NoSuchVM(vm.identity.name)
        yield


def qmp(vm: registry.VM, timeout: float = 10) -> QMP:
    return QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=timeout)


# ----------------------------------------------------------------------------- start


def start(paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool = False) -> Started:
    """Start the VM, or restore it if it was hibernated."""
    with lock(paths, who, vm):
        return start_locked(paths, who, vm, options, paused)


def start_locked(paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool = False) -> Started:
    # The state check comes first, before anything is opened: a start of a running
    # VM changes nothing (no tap opened, no file created) and says so.
    policy = config.load(paths)
    if policy.backend.slurm and not ON_NODE.get():  # a job on the node Slurm picks (docs/cluster.md)
        from kvmgate.ops import cluster

        return Started(*cluster.submit_locked(paths, who, vm, options, paused, policy, checked))  # type: ignore[arg-type]
    if runtime.is_running(vm):
        raise WrongState(f"{vm.identity.name} is already running")
    saved = registry.read_saved(vm)
    if saved is not None and options:
        raise WrongState(f"{vm.identity.name} is hibernated: it resumes with the options it was started with")
    try:
        pid, accel = _launch(paths, who, vm, saved.options if saved else options, paused, saved, policy)
    except FileRefused as err:
        if saved is None:
            raise
        raise FileRefused(f"{err}; the VM was hibernated with it: put it back, or throw the saved state away "
                          f"with `kvmgate stop {vm.identity.name} --discard`") from None  # fmt: skip
    if saved is None:
        return Started(pid, accel, False)

    from kvmgate.ops import restore  # off the plain start path

    try:
        restore.load(paths, vm, saved)
    except BaseException:
        kill_and_reap(pid)
        runtime.cleanup(vm)
        raise
    restore.resumed(paths, who, vm, saved)
    return Started(pid, accel, True)


def checked(
    paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool, saved: registry.Saved | None,
    policy: Policy, accel: Accel,
) -> tuple[Plan, pwd.struct_passwd, int, launch.Where, dict[int, int], int | None]:  # fmt: skip
    """The plan, and the owner's files opened with their rights: the last refusals."""
    pw = owner_pw(vm)
    qemu_gid = grp.getgrnam(launch.QEMU_GROUP).gr_gid
    machine = saved.machine if saved else None  # a restore: the machine type the state was saved with
    quota = None  # self-service: the owner's disk quota bounds the disks' growth (ops.quota)
    if os.path.exists(os.path.join(paths.etc, "grants.toml")):
        from kvmgate.ops import quota as disk_quota

        quota = disk_quota.disk_left(paths, policy, vm, who)
    plan = plan_for(vm, policy, options, accel, paused=paused, incoming=saved is not None, machine=machine,
                    stop_on_write_error=quota is not None)  # fmt: skip
    where = launch.Where(vm.rundir, vm.sub("log"), vm.sub("tmp"))
    if plan.dirs:
        from kvmgate.host import userdirs

        userdirs.check_dirs(plan, pw, qemu_gid)
    return plan, pw, qemu_gid, where, launch.open_user_resources(plan, pw, qemu_gid, where, policy.limits), quota


def _launch(
    paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool, saved: registry.Saved | None,
    policy: Policy,
) -> tuple[int, Accel]:  # fmt: skip
    if saved is not None:
        from kvmgate.host import qemu_version

        qemu_version.refuse_newer(paths, policy.qemu, vm.identity.name, saved.qemu)
    accel = config.accel(policy)
    if registry.read_settings(vm).forwards:  # a port another program took since: a new one, said why
        from kvmgate.host import network

        network.reclaim_ports(paths, policy, vm)
    plan, pw, qemu_gid, where, fds, quota = checked(paths, who, vm, options, paused, saved, policy, accel)
    if "-append" in plan.argv:  # what QEMU's config syntax cannot carry (model.translate._append)
        sys.stderr.write("kvmgate: note: this -append stays on QEMU's command line, which other users can read\n")
    try:
        if os.path.isdir(os.path.join(paths.state, "holds")):  # images a hibernated VM holds (host.holds)
            from kvmgate.host import holds

            holds.refuse_held(paths, vm, plan, fds)
        fsize = _file_size_limit(plan, policy.limits, quota, fds, vm)
        room = ROOM.get()
        if room is not None:  # a running-memory budget: other VMs hibernate only once nothing can refuse this one
            room(plan.memory_mib)
        # Bridged NICs and guarded ports need the host's networks and rules: after a
        # reboot, the first such start brings them back (cheap when they are up).
        if plan.host_ports or any(r.bridge for r in plan.resources):
            from kvmgate.host import network

            network.ensure_up(paths, policy)
            network.attach_taps(paths, policy, plan.resources)  # and a service VM's owner map (host.ownermap)
        if plan.vnc is not None and plan.vnc.mode == "tcp" and policy.net.ports.protect:
            from kvmgate.host import network  # the owner-only rule is in place before QEMU listens

            network.sync(paths, policy, ((plan.vnc.port, pw.pw_uid),))
        lock_fd = runtime.liveness_lock(vm)
    except BaseException:
        launch.close_all(fds)  # the taps vanish with their last descriptor
        raise
    try:
        fds |= launch.open_runtime_resources(plan, where, lock_fd)
        _prepare_owner_dir(vm, plan, pw.pw_uid)
        limit = (plan.memory_limit_mib + policy.memory_overhead_mib) << 20
        placement = cgroup.Placement(vm.key, limit, own=not policy.backend.slurm)  # Slurm: the job's cgroup
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fds[-1] = log = os.open(vm.sub("log", "qemu.log"), flags, 0o600)
        qemu_fds = {t: f for t, f in fds.items() if t >= 0}
        pid = launch.spawn(
            policy.qemu,
            plan,
            qemu_fds,
            pw,
            qemu_gid,
            where,
            placement,
            log,
            policy.max_open_files,
            fsize,
            (fds[launch.PUMP_READ], fds[launch.PUMP_LOG], policy.console_log_mib << 20)
            if launch.PUMP_READ in fds
            else None,
        )
    finally:
        launch.close_all(fds)
        os.close(lock_fd)  # QEMU holds its own copy of the liveness lock from here on
    critical.pause("start:spawned")  # tests: a signal here must not lose the pid

    def alive() -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False  # reaped already

    try:
        wait_ready(os.path.join(vm.rundir, "qmp.sock"), time.monotonic() + START_TIMEOUT, alive)
    except QMPError as err:
        from kvmgate.store.live import log_tail

        tail = log_tail(vm)
        exited = not alive()
        kill_and_reap(pid)
        if not tail or not exited:  # no refusal from QEMU: it did not answer in time
            raise KvmgateError(f"QEMU failed to start: {err}") from None
        from kvmgate.model.qemu_errors import explain

        raise QemuRefused(f"QEMU refused the VM: {explain(tail, plan)}") from None
    if plan.vnc is not None:
        from kvmgate.ops import display

        try:
            display.record(paths, policy, vm, plan)
        except (OSError, QMPError) as err:
            kill_and_reap(pid)
            raise KvmgateError(f"cannot set up the display: {err}") from None
    runtime.write_pid(vm, pid)
    runs.begin(vm, pid)
    if any(r.kind == "seed" for r in plan.resources):
        from kvmgate.host import library

        library.commit(where.logdir)
    runtime.write_options(vm, options)
    runtime.take_intended_exit(vm)  # a stale mark from an earlier run must not hide a crash
    # Only now: a start QEMU refused is a refusal (rate-limited, by the entry), never an "ok".
    argv = [policy.qemu, *plan.argv]
    audit.done(paths.audit_log, who, "start", vm.identity.owner, vm.identity.name, options=options, argv=argv)
    if plan.pidfiles:
        from kvmgate.ops import display

        display.write_admin_pidfiles(plan.pidfiles, pid)
    return pid, accel


def _prepare_owner_dir(vm: registry.VM, plan: Plan, uid: int) -> None:
    """The owner directory of this run: emptied, and made again for a VNC socket."""
    d = owner_dir(vm)
    if os.path.lexists(d):  # whatever the owner left there, however deep; never following a link
        from kvmgate.store.trees import remove_tree

        remove_tree(d)
    if plan.vnc and plan.vnc.mode == "unix":
        from kvmgate.ops import display

        display.make_socket_dir(d, uid)


def _file_size_limit(plan: Plan, limits: Limits, quota: int | None, fds: dict[int, int], vm: registry.VM) -> int:
    """QEMU's RLIMIT_FSIZE: the -snapshot overlays' bound (host.overlay), and a disk quota's (ops.quota)."""
    limit = -1  # RLIM_INFINITY: QEMU writes only the owner's own disks, its logs, saved states
    if plan.snapshot:
        from kvmgate.host import overlay

        limit = overlay.size_limit(plan, limits)
    if quota is not None:
        from kvmgate.ops import quota as disk_quota

        limit = disk_quota.size_limit(plan, fds, quota, limit, vm)
    return limit


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
