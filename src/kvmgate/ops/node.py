"""The Slurm backend's node side (docs/cluster.md): the `slurm-job` verb a VM's
job execs through sudo, as the VM's owner.

From its own ancestry (a root `slurmstepd: [JOB.STEP]` above it, and its cgroup
where Slurm made one) and never from the environment, the job it runs in: that
must be the job the login side recorded for this VM, for the recorded owner, who
is also sudo's caller. It claims the record once, starts QEMU with the local
start path (kvmgate makes no cgroup: the job's holds QEMU), restores a saved
state, reports, and waits for QEMU as the job's foreground process; when QEMU
ends it records how, and the job ends with it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from contextlib import nullcontext

from kvmgate.errors import KvmgateError, PermissionRefused, one_line
from kvmgate.host import audit, slurmjob
from kvmgate.host import slurm as hslurm
from kvmgate.host.caller import Caller
from kvmgate.model import slurm
from kvmgate.model.slurm import JobRecord
from kvmgate.ops import lifecycle
from kvmgate.ops.cluster import here
from kvmgate.ops.plan import owner_dir
from kvmgate.paths import Paths
from kvmgate.store import config, jobs, locks, note, registry, runs, runtime
from kvmgate.store.critical import act_on, deferred
from kvmgate.store.trees import remove_tree

STEPS_GRACE = 30.0  # after QEMU ends, how long the job waits for relayed verbs still finishing on it


def node_run(paths: Paths, who: Caller, name: str) -> int:
    """The job's one command (`slurm-job NAME`, as the owner through sudo)."""
    policy = config.load(paths)
    if not policy.backend.slurm:
        raise PermissionRefused("this host does not run VMs as Slurm jobs")
    vm = registry.resolve(paths, who.name, name)  # the caller's own VM, or none
    found = here()
    with jobs.record_lock(vm):  # the login side holds it from sbatch until the record is written
        first = jobs.read(vm)
    if first is None:
        raise slurm.NotThisJob(f"no job was submitted for {name}")
    try:  # Slurm's word on the job (not under the record's lock: the controller may be slow)
        fields = hslurm.show_job(policy.backend, first.job)
    except KvmgateError:
        fields = {}  # the controller does not answer: the job's identity above is enough
    with jobs.record_lock(vm):
        rec = jobs.read(vm)
        if rec is None:
            raise slurm.NotThisJob(f"no job was submitted for {name}")
        requeued = slurm.check_caller(rec, vm.key, who.uid, found, os.path.realpath(paths.sudo))
        if fields and rec.job == first.job:
            slurm.check_placement(policy.backend, fields, rec)
        node = fields.get("NodeList") if rec.job == first.job else None
        node = node if node and slurm.node_name_ok(node) else os.uname().nodename
        how = f"lost on node {rec.node}: Slurm requeued job {rec.job}, which runs again on node {node}"
        if requeued:  # Slurm ran the job again elsewhere: the run on the old node was lost with it
            runs.end(vm, how)
            audit.done(paths.audit_log, who, "requeued", vm.identity.owner, vm.identity.name, job=rec.job, how=how)
        rec = rec._replace(state="starting", node=node if slurm.node_name_ok(node) else None, pid=None,
                           claim=secrets.token_hex(8))  # fmt: skip
        jobs.write(vm, rec)
    token = lifecycle.ON_NODE.set(True)
    try:
        # The login side holds the VM lock until this reports (a relayed verb meanwhile sees "starting");
        # a requeued job has no login side waiting: it takes the lock itself.
        with locks.vm_lock(paths, vm.identity.owner, name, locks.INTERNAL_WAIT) if requeued else nullcontext():
            started = lifecycle.start_locked(paths, who, vm, list(rec.options), rec.paused)
    except KvmgateError as err:
        with jobs.record_lock(vm):
            if _ours(vm, rec):
                jobs.write(vm, rec._replace(state="failed", message=one_line(str(err)), exit=err.exit_code))
        raise
    finally:
        lifecycle.ON_NODE.reset(token)
    with jobs.record_lock(vm):
        if not _ours(vm, rec):  # the login side gave up on it meanwhile (and cancelled the job)
            lifecycle.kill_and_reap(started.pid)
            raise KvmgateError(f"job {rec.job} was given up while {name} started; it was ended")
        jobs.write(vm, rec._replace(state="running", pid=started.pid, accel=started.accel))
    if requeued:
        note.write(vm, how)  # `status` says why it runs here (a fresh boot began its console log afresh)
    return _foreground(paths, who, vm, rec, started.pid)


def _ours(vm: registry.VM, rec: JobRecord) -> bool:
    """Is the record still this claim's (not removed, not a later run's of the same job)?"""
    current = jobs.read_or_damaged(vm)
    return isinstance(current, JobRecord) and current.job == rec.job and current.claim == rec.claim


def _foreground(paths: Paths, who: Caller, vm: registry.VM, rec: JobRecord, pid: int) -> int:
    """Wait for QEMU, the job's own process; relayed signals (Slurm's SIGTERM to
    the whole step at scancel, preemption or a time limit) are noted, not obeyed:
    QEMU gets them too, and this process must live to record how the run ended."""
    got: list[int] = []
    import signal

    def noted(sig: int) -> Callable[[], None]:
        return lambda: got.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        act_on(sig, noted(sig))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with locks.vm_lock(paths, vm.identity.owner, vm.identity.name, locks.INTERNAL_WAIT):
        if not os.path.exists(os.path.join(vm.rundir, "intended-exit")):  # else: the verb that ended it says how
            if got or deferred():
                how = (
                    f"ended by Slurm on node {rec.node}: job {rec.job} was signalled "
                    "(scancel, preemption or a time limit)"
                )
            elif code < 0:
                how = f"QEMU was killed by signal {-code} on node {rec.node}"
            else:
                how = f"QEMU exited by itself on node {rec.node} (a crash, or the guest powered off)"
            if not runtime.is_running(vm):
                runtime.cleanup(vm)
                remove_tree(owner_dir(vm))
            runs.end(vm, how)
            note.tell(vm, how)  # in its console log too (`kvmgate log`)
            audit.done(paths.audit_log, who, "ended", vm.identity.owner, vm.identity.name, job=rec.job, how=how)
        if _ours(vm, rec):  # not a requeued run's, elsewhere, of the same job
            jobs.remove(vm, rec.job)
    deadline = time.monotonic() + STEPS_GRACE
    while slurmjob.other_steps(rec.job, os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)  # a relayed stop or hibernate finishing its report: the job's end would cut it short
    return 0
