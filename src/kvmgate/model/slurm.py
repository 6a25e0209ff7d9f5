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

from kvmgate.errors import PermissionRefused, PolicyError
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
_PATH = Regex(r"/[A-Za-z0-9_./-]{1,255}")
_WORD = Regex(r"[A-Za-z0-9_./:=-]{1,255}")  # what the job's one shell line may contain
_STATE = Regex(r"[A-Z_]{1,32}")
_CLAIM = Regex(r"[0-9a-f]{16}")
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
    conf: str | None = None  # slurm.conf, if not Slurm's default (SLURM_CONF for every Slurm command kvmgate runs)

    @property
    def slurm(self) -> bool:
        return self.kind == "slurm"


def parse_backend(data: Mapping[str, Any]) -> Backend:
    """The policy's `[backend]` table, strictly: every name reaches sbatch's argv."""

    def fail(msg: str) -> PolicyError:
        return PolicyError("policy", f"backend: {msg}")

    if not isinstance(data, Mapping):
        raise fail("must be a table")
    known = {
        "kind",
        "partition",
        "service_partition",
        "account",
        "qos",
        "features",
        "cpu_model",
        "overhead_mib",
        "conf",
    }
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
    conf = data.get("conf")
    if conf is not None and not (isinstance(conf, str) and _PATH.fullmatch(conf) and ".." not in conf.split("/")):
        raise fail("conf must be an absolute path (letters, digits, _ . - /)")
    if kind == "slurm" and names["partition"] is None:
        raise fail("kind = slurm needs a partition")
    return Backend(
        kind, names["partition"], names["service_partition"], names["account"], names["qos"], tuple(features),
        cpu, overhead, conf,
    )  # fmt: skip


def backend_table(b: Backend) -> str:
    """The policy's [backend] table for `b` (admin init --backend), every value already checked."""
    lines = ["[backend]", f'kind = "{b.kind}"']
    for key in ("partition", "service_partition", "account", "qos", "cpu_model", "conf"):
        value = getattr(b, key)
        if value is not None:
            lines.append(f'{key} = "{value}"')
    if b.features:
        lines.append("features = [" + ", ".join(f'"{f}"' for f in b.features) + "]")
    if b.overhead_mib != Backend().overhead_mib:
        lines.append(f"overhead_mib = {b.overhead_mib}")
    return "\n".join(lines) + "\n"


def node_name_ok(node: str) -> bool:
    """One Slurm node name (what a job that runs has in NodeList)."""
    return bool(_NAME.fullmatch(node))


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
    node: str | None = None  # a pinned node (admin move --to)
    exclude: str | None = None  # a node it must leave (admin move, admin evacuate)


def sbatch_argv(sbatch: str, backend: Backend, s: Submit, command: Sequence[str]) -> list[str]:
    """Root's submission of the VM's job, run as its owner. No environment crosses
    (--export=NONE), the job's directory is /, and its output goes nowhere (the
    console log is kvmgate's). The job's one line execs `command`: root's helper
    through sudo, with the VM's name; words that need no quoting only."""
    if not command or not all(_WORD.fullmatch(w) for w in command):
        raise ValueError("the job's command must be plain words")
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
    if s.exclude is not None and s.node is None:
        if not _NAME.fullmatch(s.exclude):
            raise PolicyError("node", f"{s.exclude[:64]!r} is not a node name")
        argv.append(f"--exclude={s.exclude}")
    argv.append("--wrap=exec " + " ".join(command))
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
    step = step_from_stepd(cmdline)
    return step[0] if step else None


def step_from_stepd(cmdline: bytes) -> tuple[int, str] | None:
    """(job, step) from slurmstepd's title: `batch`, `extern` or a step number."""
    m = _STEPD.fullmatch(cmdline.rstrip(b"\0").replace(b"\0", b" ").decode("ascii", "replace").strip())
    return (int(m.group(1)), m.group(2)) if m else None


class Seen(NamedTuple):
    """What the node side finds above itself: a root slurmstepd's job and step, and
    the uid of the process that slurmstepd started (the job's user)."""

    job: int
    step: str
    uid: int
    via: tuple[str, ...] = ()  # the programs between the helper and slurmstepd


STATES = ("submitted", "starting", "running", "failed")
MAX_OPTIONS = 256
MAX_OPTIONS_BYTES = 64 << 10


class JobRecord(NamedTuple):
    """STATE/vms/<dir>/job.json, root's 0600 on the shared state: the job the
    login-side helper submitted for this VM and what it is to do. The node-side
    helper starts QEMU only inside this job, for this owner, with these options.

    submitted (by the login side) -> starting (the node side claimed it) ->
    running (QEMU answered; pid and node known) | failed (message, exit code)."""

    job: int
    key: str
    uid: int
    submitted: int  # Unix time of the submission
    options: tuple[str, ...] = ()  # the owner's options, checked on the login node and again on the node
    paused: bool = False
    state: str = "submitted"
    node: str | None = None  # where it runs, once the node side has claimed it
    pid: int | None = None  # QEMU's pid on that node
    message: str | None = None  # failed: the node side's refusal, in one line
    exit: int | None = None  # failed: its exit code
    accel: str | None = None  # running: the accelerator the node used
    claim: str | None = None  # the node side's token once it claimed the record: its run's, not a later one's

    def to_json(self) -> str:
        data = {"version": 1, **self._asdict()}
        data["options"] = list(self.options)
        return json.dumps(data, sort_keys=True)


class NotThisJob(PermissionRefused):
    """The caller does not run in the job kvmgate submitted for this VM."""


def parse_record(text: str | bytes) -> JobRecord:
    """Strictly: a record that does not read is no authority for a node to start anything."""
    try:
        data = json.loads(text)
    except ValueError:
        raise NotThisJob("the VM's job record is not JSON") from None
    bad = NotThisJob("the VM's job record has the wrong shape")
    if not isinstance(data, dict) or data.get("version") != 1 or set(data) != {"version", *JobRecord._fields}:
        raise bad

    def count(v: object, none: bool = False) -> bool:
        return (none and v is None) or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63)

    if not all(count(data[k]) for k in ("job", "uid", "submitted")) or not count(data["pid"], True):
        raise bad
    if not count(data["exit"], True) or not isinstance(data["key"], str) or not isinstance(data["paused"], bool):
        raise bad
    if data["state"] not in STATES or not (data["message"] is None or isinstance(data["message"], str)):
        raise bad
    if data["accel"] not in (None, "kvm", "tcg"):
        raise bad
    if data["claim"] is not None and not (isinstance(data["claim"], str) and _CLAIM.fullmatch(data["claim"])):
        raise bad
    node, options = data["node"], data["options"]
    if node is not None and not (isinstance(node, str) and _NAME.fullmatch(node)):
        raise bad
    if (
        not isinstance(options, list)
        or len(options) > MAX_OPTIONS
        or not all(isinstance(o, str) for o in options)
        or sum(len(o) for o in options) > MAX_OPTIONS_BYTES
    ):
        raise bad
    fields = {k: data[k] for k in JobRecord._fields}
    fields["options"] = tuple(options)
    return JobRecord(**fields)


def check_caller(record: JobRecord, key: str, caller_uid: int, seen: Seen | None, sudo: str = "") -> bool:
    """The node side's one question, from sources it trusts: `seen`, the job and
    step its own process runs in (its slurmstepd ancestor, and its cgroup where
    Slurm made one) and that job's user. Refused unless they name the job recorded
    for this VM, its batch step (which only Slurm starts: a user's `srun --jobid
    --overlap` is another step), for this VM's owner, who is also sudo's caller,
    and nothing but `sudo` (its real path) runs between slurmstepd and the helper:
    the batch script exec'd it, so no process of the owner's is left in the step
    that could run the node side again.

    A record already claimed may be claimed again only by the batch step: Slurm
    runs a job's batch step again only when it requeued the job (a service VM whose
    node was lost). Returns whether this is such a requeued run."""
    if record.key != key:
        raise NotThisJob("the job record is another VM's")
    if seen is None:
        raise NotThisJob("not running inside a Slurm job")
    if seen.job != record.job:
        raise NotThisJob(f"job {seen.job} is not the job kvmgate submitted for this VM")
    if seen.step != "batch":
        raise NotThisJob(f"job {record.job} has started this VM already" if record.state != "submitted"
                         else "only the job's own batch step starts the VM")  # fmt: skip
    if caller_uid != record.uid or seen.uid != record.uid:
        raise NotThisJob("the job does not run as the VM's owner")
    if seen.via != (sudo,):  # the batch script exec'd sudo: nothing of the owner's runs between
        raise NotThisJob("only the job's own command starts the VM (slurmstepd, then sudo, then kvmgate)")
    if record.state == "failed":
        raise NotThisJob(f"job {record.job} failed to start this VM already")
    return record.state != "submitted"


def check_placement(backend: Backend, fields: Mapping[str, str], record: JobRecord) -> None:
    """Slurm's word on the job, before the node side claims it: still the owner's,
    still in kvmgate's partition (an owner may move a pending job of theirs)."""
    allowed = {backend.partition, backend.service_partition or backend.partition}
    if fields.get("UserId") != str(record.uid):
        raise NotThisJob(f"job {record.job} does not run as the VM's owner")
    if fields.get("Partition") not in allowed:
        raise NotThisJob(f"job {record.job} was moved out of kvmgate's partition")


# Job states (squeue/scontrol JobState) in which the job still holds, or will hold, its VM.
LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"})  # fmt: skip


SQUEUE_FORMAT = "%T|%N|%r|%P|%U"  # nothing a job's owner may set freely (not its name, not its comment)
_SQUEUE_FIELDS = ("JobState", "NodeList", "Reason", "Partition", "UserId")


def parse_squeue(text: str) -> dict[str, str]:
    """`squeue --noheader --jobs=J --states=all --format=SQUEUE_FORMAT`: one line.
    Not `scontrol show job`, whose KEY=VALUE words a job name with spaces (the
    owner's to choose) could imitate. {} unless exactly one well-formed line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        return {}
    values = lines[0].strip().split("|")
    if len(values) != len(_SQUEUE_FIELDS) or not _STATE.fullmatch(values[0]):
        return {}
    return dict(zip(_SQUEUE_FIELDS, values, strict=True))


def ending(fields: Mapping[str, str], node: str | None) -> str:
    """How the run ended, in `status`'s words, when the job ended without the node
    side saying so: the node was lost, or Slurm ended the job (scancel, preemption,
    a time limit), or Slurm no longer remembers the job."""
    state = fields.get("JobState", "")
    where = f" on node {node}" if node else ""
    if not state:
        return f"lost{where}: Slurm no longer knows its job"
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return f"lost{where}: the node failed (job {state})"
    reason = fields.get("Reason", "None")
    said = f", {reason}" if reason not in ("None", "") else ""
    return f"ended by Slurm{where}: job {state}{said}"
