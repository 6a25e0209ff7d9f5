"""A VM's Slurm job record: `STATE/vms/<identity>/job.json` (root 0600), on the
state storage every node shares (docs/cluster.md).

It is the only thing that lets a node start a VM: the login-side helper writes
it after `sbatch` answered, the node-side helper claims it (submitted ->
starting) only from inside that very job, and reports back through it (running,
or failed with its refusal). Its own small lock (`job.lock` beside it) makes each
of those steps one step: a claim and a login side's give-up cancel cannot both
win. Taken inside the VM operation lock when both are held.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kvmgate.model.slurm import JobRecord, NotThisJob, parse_record
from kvmgate.store.files import flock, read_small, write_atomic
from kvmgate.store.registry import VM
from kvmgate.store.runtime import is_running

RECORD = "job.json"


def read(vm: VM) -> JobRecord | None:
    """None: no job. A record that does not read is no job either, for a node
    (it refuses), and is reported by the login side (`ops.cluster.settle`)."""
    try:
        return parse_record(read_small(vm.sub(RECORD), 128 << 10))
    except FileNotFoundError:
        return None


def read_or_damaged(vm: VM) -> JobRecord | NotThisJob | None:
    try:
        return read(vm)
    except NotThisJob as err:
        return err


def active(vm: VM) -> JobRecord | None:
    """The VM's job, if it has one that started or may start it (not failed)."""
    rec = read_or_damaged(vm)
    return rec if isinstance(rec, JobRecord) and rec.state != "failed" else None


def running(vm: VM) -> bool:
    """Does QEMU run here, or in a Slurm job on some node? What a login node must
    ask before it changes or deletes a VM (a stale record of a lost node is settled
    by `status` or `start`)."""
    return is_running(vm) or active(vm) is not None


def write(vm: VM, record: JobRecord) -> None:
    write_atomic(vm.sub(RECORD), record.to_json(), 0o600, fsync=True)


def remove(vm: VM, job: int | None = None) -> None:
    """The record, if it is still job's (None: whatever job it names)."""
    if job is not None:
        current = read_or_damaged(vm)
        if isinstance(current, JobRecord) and current.job != job:
            return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vm.sub(RECORD))


@contextlib.contextmanager
def record_lock(vm: VM) -> Iterator[None]:
    with flock(vm.sub("job.lock"), 30, f"{vm.identity.name}'s job record"):
        yield
