"""The Slurm backend as data: the policy's `[backend]` table, the sbatch and srun
command lines, and how a node-side helper recognises the job it runs in. Pure.

Each VM on a Slurm cluster is a job that runs as its owner (docs/cluster.md).
Root on a login node submits it (`sbatch --uid --gid`: Slurm 22.05 would
otherwise run the job with the submitter's gid, 0); the job's only step runs a
root-owned entry point, which asks the helper (through sudo, as the owner) to
start QEMU as its foreground child, inside the job's cgroup. The helper trusts
no environment variable for "which job": it reads its own cgroup path (which
sudo cannot change and Slurm made) or the chain of its ancestors up to a
root-owned `slurmstepd: [JOB.STEP]`, and checks that job against the record
the login-side helper wrote when it submitted it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from kvmgate.errors import KvmgateError, PolicyError
from kvmgate.model.regex import Regex

KINDS = ("local", "slurm")
_NAME = Regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # partitions, accounts, QOS, node names
_FEATURE = Regex(r"[A-Za-z0-9_.-]{1,64}")
_CPU = Regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a QEMU -cpu model name
JOB_NAME_PREFIX = "kvmgate-"
_V2 = Regex(r"0::/(?:.*/)?job_([0-9]{1,10})/step_(batch|extern|[0-9]{1,10})(?:/.*)?")
_V1 = Regex(
    r"[0-9]+:(?:[a-z_,=]*,)?freezer(?:,[a-z_,=]*)?:/slurm[^/]*/uid_([0-9]{1,10})/job_([0-9]{1,10})/step_(batch|[0-9]{1,10})(?:/.*)?"
)
_STEPD = Regex(r"slurmstepd: \[([0-9]{1,10})\.(batch|extern|[0-9]{1,10})\]")


class Backend(NamedTuple):
    """Where VMs run: `local` (this host, the default) or `slurm`."""

    kind: str = "local"
    partition: str | None = None  # users' VMs
    service_partition: str | None = None  # service VMs (requeued when a node is lost); default: partition
    account: str | None = None
    qos: str | None = None
    features: tuple[str, ...] = ()  # node features every VM's node must have (--constraint)
    cpu_model: str | None = None  # -cpu for cluster VMs: the same on every node, so a state restores anywhere
    overhead_mib: int = 256  # --mem = the guest's memory + this (QEMU, TCG's cache, the helper)

    @property
    def slurm(self) -> bool:
        return self.kind == "slurm"


def parse_backend(data: Mapping[str, Any]) -> Backend:
    """The policy's `[backend]` table, strictly: every name reaches sbatch's argv."""

    def fail(msg: str) -> PolicyError:
        return PolicyError("policy", f"backend: {msg}")

    if not isinstance(data, Mapping):
        raise fail("must be a table")
    known = {"kind", "partition", "service_partition", "account", "qos", "features", "cpu_model", "overhead_mib"}
    extra = set(data) - known
    if extra:
        raise fail(f"unknown key {sorted(extra)[0]!r}")
    kind = data.get("kind", "local")
    if kind not in KINDS:
        raise fail("kind must be local or slurm")
    names: dict[str, str | None] = {}
    for key in ("partition", "service_partition", "account", "qos"):
        v = data.get(key)
        if v is not None and not (isinstance(v, str) and _NAME.fullmatch(v)):
            raise fail(f"{key} must be a Slurm name (letters, digits, _ . -)")
        names[key] = v
    features = data.get("features", [])
    if (
        not isinstance(features, list)
        or len(features) > 16
        or not all(isinstance(f, str) and _FEATURE.fullmatch(f) for f in features)
    ):
        raise fail("features must be a list of at most 16 node feature names")
    cpu = data.get("cpu_model")
    if cpu is not None and not (isinstance(cpu, str) and _CPU.fullmatch(cpu)):
        raise fail("cpu_model must be a QEMU CPU model name")
    overhead = data.get("overhead_mib", 256)
    if not isinstance(overhead, int) or isinstance(overhead, bool) or not 64 <= overhead <= 65536:
        raise fail("overhead_mib must be an integer between 64 and 65536")
    if kind == "slurm" and names["partition"] is None:
        raise fail("kind = slurm needs a partition")
    return Backend(
        kind, names["partition"], names["service_partition"], names["account"], names["qos"], tuple(features),
        cpu, overhead,
    )  # fmt: skip


def job_name(key: str) -> str:
    """What squeue shows. Users can rename their jobs, so it never identifies the VM:
    the registry's record of the job id does."""
    return JOB_NAME_PREFIX + key[:24]


class Submit(NamedTuple):
    key: str
    uid: int
    gid: int
    memory_mib: int
    cpus: int
    service: bool = False
    node: str | None = None  # a pinned node (admin move --to, or the VM's own pin)


def sbatch_argv(sbatch: str, backend: Backend, s: Submit, entry: str) -> list[str]:
    """Root's submission of the VM's job, run as its owner. No environment crosses
    (--export=NONE), the job's directory is /, and its output goes nowhere (the
    console log is kvmgate's). The entry point is root's file and takes the key only."""
    if not backend.slurm or backend.partition is None:
        raise ValueError("not a Slurm backend")
    partition = (backend.service_partition or backend.partition) if s.service else backend.partition
    argv = [
        sbatch, "--parsable", f"--uid={s.uid}", f"--gid={s.gid}", f"--job-name={job_name(s.key)}",
        "--nodes=1", "--ntasks=1", f"--cpus-per-task={s.cpus}", f"--mem={s.memory_mib + backend.overhead_mib}M",
        "--time=UNLIMITED", f"--partition={partition}", "--export=NONE", "--chdir=/", "--output=/dev/null",
        "--requeue" if s.service else "--no-requeue",
    ]  # fmt: skip
    if backend.account:
        argv.append(f"--account={backend.account}")
    if backend.qos:
        argv.append(f"--qos={backend.qos}")
    if backend.features:
        argv.append("--constraint=" + "&".join(backend.features))
    if s.node is not None:
        if not _NAME.fullmatch(s.node):
            raise PolicyError("--to", f"{s.node[:64]!r} is not a node name")
        argv.append(f"--nodelist={s.node}")
    argv.append(f"--wrap=exec {entry} {s.key}")
    return argv


def parse_job_id(out: str) -> int:
    """`sbatch --parsable`: `JOBID` or `JOBID;CLUSTER`."""
    first = out.strip().split(";", 1)[0]
    if not first.isascii() or not first.isdigit() or not 0 < int(first) < 1 << 32:
        raise ValueError(f"sbatch said {out.strip()[:80]!r}, not a job id")
    return int(first)


def srun_argv(srun: str, job: int, command: Sequence[str], pty: bool = False) -> list[str]:
    """A step in the VM's running job, run by its owner (root has dropped to them):
    `--overlap`, so it never waits for the resources the VM's own step holds."""
    argv = [srun, f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet", "--export=NONE"]
    return [*argv, *(["--pty"] if pty else []), *command]


def job_from_cgroup(text: str, uid: int | None = None) -> int | None:
    """The Slurm job a process runs in, from its /proc/PID/cgroup: cgroup v2's
    `.../job_J/step_S/...`, or v1's freezer `/slurm/uid_U/job_J/step_S`. None if it
    is in no job step (or, on v1, in another user's)."""
    for line in text.splitlines():
        m = _V2.fullmatch(line)
        if m:
            return int(m.group(1))
        m = _V1.fullmatch(line)
        if m and (uid is None or int(m.group(1)) == uid):
            return int(m.group(2))
    return None


def job_from_stepd(cmdline: bytes) -> int | None:
    """`slurmstepd: [J.batch]`, the title slurmstepd gives itself: the job of the
    processes below it (read only from a root-owned /usr/sbin/slurmstepd)."""
    m = _STEPD.fullmatch(cmdline.rstrip(b"\0").replace(b"\0", b" ").decode("ascii", "replace").strip())
    return int(m.group(1)) if m else None


class JobRecord(NamedTuple):
    """RUN-shared STATE/vms/<dir>/job.json, root's: the job the login-side helper
    submitted for this VM. The node-side helper starts QEMU only inside this job."""

    job: int
    key: str
    uid: int
    submitted: int  # Unix time of the submission
    restore: bool = False  # the job restores the VM's saved state rather than boot it
    node: str | None = None  # where it runs, once the node side has said so

    def to_json(self) -> str:
        return json.dumps({"version": 1, **self._asdict()}, sort_keys=True)


class NotThisJob(KvmgateError):
    """The caller does not run in the job kvmgate submitted for this VM."""


def parse_record(text: str | bytes) -> JobRecord:
    try:
        data = json.loads(text)
    except ValueError:
        raise NotThisJob("the VM's job record is not JSON") from None
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) != {"version", *JobRecord._fields}:
        raise NotThisJob("the VM's job record has the wrong shape")
    ints = ("job", "uid", "submitted")
    if not all(isinstance(data[k], int) and not isinstance(data[k], bool) and data[k] >= 0 for k in ints):
        raise NotThisJob("the VM's job record has the wrong shape")
    node = data["node"]
    if not isinstance(data["key"], str) or not isinstance(data["restore"], bool):
        raise NotThisJob("the VM's job record has the wrong shape")
    if node is not None and not (isinstance(node, str) and _NAME.fullmatch(node)):
        raise NotThisJob("the VM's job record has the wrong shape")
    return JobRecord(data["job"], data["key"], data["uid"], data["submitted"], data["restore"], node)


def check_caller(record: JobRecord, key: str, caller_uid: int, job_seen: int | None, job_uid: int | None) -> None:
    """The node side's one question, from sources it trusts: `job_seen`, the job its
    own process runs in (its cgroup, or its slurmstepd ancestor), and `job_uid`, that
    job's user as slurmctld says. Refused unless both name the job recorded for this
    VM, for this VM's owner, who is also the caller."""
    if record.key != key:
        raise NotThisJob("the job record is another VM's")
    if job_seen is None:
        raise NotThisJob("not running inside a Slurm job")
    if job_seen != record.job:
        raise NotThisJob(f"job {job_seen} is not the job kvmgate submitted for this VM")
    if caller_uid != record.uid or job_uid != record.uid:
        raise NotThisJob("the job does not run as the VM's owner")
