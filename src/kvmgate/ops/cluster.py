"""The Slurm backend (docs/cluster.md): each VM a job that runs as its owner on
the node the scheduler picks, QEMU its foreground child.

Three sides, one record (`store.jobs`, on the shared state):

- **login side** (`submit_locked`, under the VM operation lock): the checks of
  a local start (the owner's files opened with their rights, then closed),
  then `sbatch --uid --gid` as root, then the record, then it waits, still
  holding the VM lock, until the node side says running or failed;
- **node side** (`node_run`, the `slurm-job` verb the job execs through sudo):
  from its own ancestry (a root `slurmstepd: [JOB.STEP]` above it) and never
  from the environment, the job it runs in; that must be the recorded job, for
  the recorded owner, who is sudo's caller. It claims the record once, starts
  QEMU with the local start path (no cgroup of kvmgate's: the job's holds it),
  restores a saved state, reports, and waits for QEMU in the foreground; when
  QEMU ends it records how and lets the job end;
- **relays** (`relay`): a verb about a VM that runs in a job is run again, as
  the owner, inside that job on its node (`srun --jobid --overlap`, sudo, the
  helper), where it is a local verb. No root ssh between nodes.

A record whose job Slurm no longer runs is settled under the VM lock: the run
is recorded as lost (the node failed) or ended by Slurm, and the VM is stopped
or hibernated as its shared state says.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from kvmgate.errors import Busy, KvmgateError, WrongState
from kvmgate.host import audit, slurmjob
from kvmgate.host import slurm as hslurm
from kvmgate.host.caller import Caller
from kvmgate.host.launch import close_all
from kvmgate.model import slurm
from kvmgate.model.policy.policy import Policy
from kvmgate.model.slurm import JobRecord
from kvmgate.model.terminal import Visible
from kvmgate.model.translate import Plan
from kvmgate.ops.plan import owner_pw
from kvmgate.paths import Paths
from kvmgate.store import config, jobs, locks, registry, runs

PENDING_TIMEOUT = 60.0  # a job no node takes within this is cancelled: the start is refused
STARTING_TIMEOUT = 3600.0  # a claimed job: QEMU's start and a restore (bounded by the hibernate's own bound)
STEPS_GRACE = 30.0  # after QEMU ends, how long the job waits for relayed verbs still finishing on it
TO: contextvars.ContextVar[str | None] = contextvars.ContextVar("to", default=None)  # admin move --to
AWAY_FROM: contextvars.ContextVar[str | None] = contextvars.ContextVar("away", default=None)  # admin move, evacuate


class Failed(KvmgateError):
    """The node side's refusal, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def here() -> slurm.Seen | None:
    """The job and step this process runs in, and the job's user, from its
    slurmstepd ancestor and its cgroup where Slurm made one (they must agree)."""
    found = slurmjob.job_and_user(os.getpid())
    by_cgroup = slurmjob.job_of_cgroup(os.getpid())
    if found is None or (by_cgroup is not None and by_cgroup != found.job):
        return None
    return found


def inside(record: JobRecord) -> bool:
    found = here()
    return found is not None and found.job == record.job


# ------------------------------------------------------------------------ settle


def settle(paths: Paths, policy: Policy, vm: registry.VM) -> JobRecord | None:
    """Under the VM lock: the VM's job if Slurm still runs it. A record of a job
    that ended without its node side saying so (the node was lost, Slurm killed
    the job) is settled: how the run ended is recorded, and the record goes."""
    rec = jobs.read_or_damaged(vm)
    if rec is None:
        return None
    if isinstance(rec, KvmgateError):  # never an authority; say so, and let the VM start afresh
        jobs.remove(vm)
        runs.end(vm, "lost: its job record was damaged")
        return None
    fields = hslurm.show_job(policy.backend, rec.job)
    if fields.get("JobState") in slurm.LIVE:
        return rec
    if rec.state in ("starting", "running"):
        how = slurm.ending(fields, rec.node)
        runs.end(vm, how)
        from kvmgate.store import note

        note.tell(vm, how)
        audit.record(paths.audit_log, caller="kvmgate", verb="lost", vm=vm.identity.name, owner=vm.identity.owner,
                     outcome="ok", job=rec.job, how=how)  # fmt: skip
    jobs.remove(vm, rec.job)
    return None


# -------------------------------------------------------------------- login side


class Placed(NamedTuple):
    pid: int
    accel: str
    restored: bool
    node: str | None
    job: int


def submit_locked(
    paths: Paths, who: Caller, vm: registry.VM, options: list[str], paused: bool, policy: Policy, checked: Checks
) -> Placed:
    """Start (or restore) the VM as a job, holding the VM lock until it runs."""
    name = vm.identity.name
    rec = settle(paths, policy, vm)
    if rec is not None:
        where = f"on node {rec.node}, job {rec.job}" if rec.node else f"job {rec.job} waits for a node"
        raise WrongState(f"{name} is already running ({where})")
    saved = registry.read_saved(vm)
    plan = check_locally(paths, who, vm, options, saved, policy, checked)
    pw = owner_pw(vm)
    cpus = 1
    if "-smp" in plan.argv:
        word = plan.argv[plan.argv.index("-smp") + 1].split(",")[0].removeprefix("cpus=")
        cpus = int(word) if word.isdigit() else 1
    sub = slurm.Submit(vm.key, pw.pw_uid, pw.pw_gid, plan.memory_limit_mib, max(cpus, 1),
                       registry.read_settings(vm).service, TO.get(), AWAY_FROM.get())  # fmt: skip
    command = [paths.sudo, "-n", paths.helper, "slurm-job", name]
    with jobs.record_lock(vm):
        job = hslurm.submit(policy.backend, sub, command)
        jobs.write(vm, JobRecord(job, vm.key, pw.pw_uid, int(time.time()), tuple(options), paused))
    audit.done(paths.audit_log, who, "submit", vm.identity.owner, name, job=job, node=TO.get())
    rec = _wait_running(paths, policy, vm, job)
    return Placed(rec.pid or 0, rec.accel or "?", saved is not None, rec.node, job)


def _wait_running(paths: Paths, policy: Policy, vm: registry.VM, job: int) -> JobRecord:
    start = time.monotonic()
    asked = 0.0
    while True:
        rec = jobs.read_or_damaged(vm)
        if isinstance(rec, JobRecord) and rec.job == job and rec.state == "running":
            return rec
        if isinstance(rec, JobRecord) and rec.job == job and rec.state == "failed":
            jobs.remove(vm, job)
            raise Failed(rec.message or "the node refused the VM", rec.exit or 1)
        if not isinstance(rec, JobRecord) or rec.job != job:
            raise KvmgateError(f"the record of job {job} vanished while it started")
        now = time.monotonic()
        if now - asked >= 1.0:
            asked = now
            fields = hslurm.show_job(policy.backend, job)
            state = fields.get("JobState", "")
            if state not in slurm.LIVE:
                with jobs.record_lock(vm):
                    again = jobs.read(vm)
                    if again is not None and again.state == "running":
                        continue
                    jobs.remove(vm, job)
                raise KvmgateError(f"job {job} ended before the VM ran: {slurm.ending(fields, None)}")
            if rec.state == "submitted" and now - start > PENDING_TIMEOUT:
                with jobs.record_lock(vm):
                    again = jobs.read(vm)
                    if again is not None and again.state == "submitted":
                        hslurm.cancel(policy.backend, job)
                        jobs.remove(vm, job)
                        reason = fields.get("Reason", "")
                        raise WrongState(
                            f"no node took {vm.identity.name} within {int(PENDING_TIMEOUT)} s "
                            f"(job {job} pending: {reason}); it was cancelled, nothing started"
                        )
            if now - start > STARTING_TIMEOUT:
                hslurm.cancel(policy.backend, job)
                raise KvmgateError(f"job {job} did not start the VM within {int(STARTING_TIMEOUT)} s; cancelled")
        time.sleep(0.05)


# ops.lifecycle.checked: the plan and the owner's files opened with their rights (passed in: this
# module is below ops.lifecycle, which calls it).
Checks = Callable[..., tuple[Plan, Any, int, Any, dict[int, int], Any]]


def check_locally(
    paths: Paths,
    who: Caller,
    vm: registry.VM,
    options: list[str],
    saved: registry.Saved | None,
    policy: Policy,
    checked: Checks,
) -> Plan:
    """A cluster start's checks on the login node, as a local start makes them; the files are closed again."""
    if saved is not None and options:
        raise WrongState(f"{vm.identity.name} is hibernated: it resumes with the options it was started with")
    plan, _, _, _, fds, _ = checked(paths, who, vm, saved.options if saved else options, False, saved, policy,
                                     config.accel(policy),
                                     )  # fmt: skip
    close_all(fds)
    return plan


# ------------------------------------------------------------------------- relay


def running_elsewhere(paths: Paths, policy: Policy, vm: registry.VM) -> JobRecord | None:
    """The VM's job if it runs on a node this process is not inside of; a job that
    ended is settled (under the VM lock) and gives None."""
    rec = jobs.read_or_damaged(vm)
    if not isinstance(rec, JobRecord) or rec.state == "failed":
        return None
    if inside(rec):
        return None
    if slurmjob.under_a_step(os.getpid()):
        raise WrongState("this runs inside a Slurm job that is not the VM's: run kvmgate on a login node")
    if rec.state != "running":
        raise Busy(f"{vm.identity.name} is starting (job {rec.job})")
    state = hslurm.show_job(policy.backend, rec.job).get("JobState")
    if state == "RUNNING":
        return rec
    if state in slurm.LIVE:  # requeued (its node was lost), or ending
        raise Busy(f"{vm.identity.name}'s job {rec.job} is {state.lower()}: try again shortly")
    with locks.vm_lock(paths, vm.identity.owner, vm.identity.name, locks.WAIT):
        if settle(paths, policy, vm) is None:
            return None
    return rec


def wait_ended(policy: Policy, vm: registry.VM, job: int, seconds: float = 60.0) -> None:
    """After a relayed stop or hibernate: until the VM's job has let go of its
    record and Slurm no longer runs it (squeue shows it gone), so that a start
    right after it is a new job, not "already running"."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rec = jobs.read_or_damaged(vm)
        if not (isinstance(rec, JobRecord) and rec.job == job):  # the node side let go: now ask Slurm
            if hslurm.show_job(policy.backend, job).get("JobState") not in slurm.LIVE:
                return
            time.sleep(0.2)
        time.sleep(0.05)


RELAY_TIMEOUT = 3600.0  # a relay for anyone but the owner: the bound of the longest operation (a hibernate)


def relay(paths: Paths, policy: Policy, vm: registry.VM, rec: JobRecord, argv: list[str], capture: bool = False,
          pty: bool = False, stdin: bool = False) -> tuple[int, str, str]:  # fmt: skip
    """`argv` (a helper request, without --owner) run by the owner inside the VM's
    job on its node, where it is a local request. `capture` for anyone but the
    owner (root, kvmgate's own actors): the owner's process gets no terminal of
    theirs, and is bounded in time (host.slurm.srun_as); what it printed comes back
    with control characters made visible (model.terminal): it is the owner's
    process, so every byte of it is theirs to choose (a guest's console, or
    anything written into their own srun), and it goes to root's terminal."""
    pw = owner_pw(vm)
    command = [paths.sudo, "-n", paths.helper, *argv]
    if not capture:
        return hslurm.srun_as(policy.backend, pw, rec.job, command, pty=pty)
    code, out, err = hslurm.srun_as(policy.backend, pw, rec.job, command, capture=True, stdin=stdin,
                                    timeout=RELAY_TIMEOUT)  # fmt: skip
    return code, _visible(out), _visible(err)


def _visible(text: str) -> str:
    return Visible().feed(text.encode(), final=True).decode()
