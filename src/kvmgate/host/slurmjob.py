"""Which Slurm job a process runs in, from what the kernel and Slurm's root-owned
processes say, never from the environment (model.slurm has the shapes).

- its ancestors (required): the first one that is root's `/usr/sbin/slurmstepd`
  says `slurmstepd: [JOB.STEP]` in its title. A process that escaped its step (a
  double fork to init) has no such ancestor and is in no job;
- its cgroup (`/proc/PID/cgroup`), where Slurm's cgroup plugins made one: it must
  name the same job (ops.cluster.here).

Called by the node-side helper for its own parent chain (sudo's caller), so the
pids walked are alive: each is read once, and a pid that vanishes mid-walk ends
the walk with "no job".
"""

from __future__ import annotations

import os

from kvmgate.model import slurm

STEPD = "/usr/sbin/slurmstepd"
MAX_DEPTH = 64


def _read(path: str, size: int = 4096) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _status(pid: int) -> tuple[int, int] | None:
    """(parent pid, real uid) of pid."""
    ppid = uid = None
    for line in _read(f"/proc/{pid}/status", 8192).decode("ascii", "replace").splitlines():
        if line.startswith("PPid:"):
            ppid = int(line.split()[1])
        elif line.startswith("Uid:"):
            uid = int(line.split()[1])
    return None if ppid is None or uid is None else (ppid, uid)


def _is_stepd(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe in (STEPD, os.path.realpath(STEPD))  # Debian: an alternative, slurmstepd-wlm


def job_and_user(pid: int) -> slurm.Seen | None:
    """The nearest root-owned slurmstepd above pid names the job and step; its
    child, which slurmstepd made, runs as the job's user; `via` are the programs
    between pid and slurmstepd (for the node side: exactly sudo)."""
    below_uid = -1
    via: list[str] = []
    first = pid
    for _ in range(MAX_DEPTH):
        st = _status(pid)
        if st is None:
            return None
        ppid, uid = st
        if uid == 0 and _is_stepd(pid):
            step = slurm.step_from_stepd(_read(f"/proc/{pid}/cmdline"))
            return None if step is None or below_uid < 0 else slurm.Seen(*step, below_uid, tuple(via))
        if ppid <= 1:
            return None
        if pid != first:
            try:
                via.append(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                via.append("?")
        below_uid, pid = uid, ppid
    return None


def under_a_step(pid: int) -> bool:
    """Is any ancestor of pid named slurmstepd (by its comm, which anyone can set)?
    Used only to refuse: a relay never starts a relay."""
    for _ in range(MAX_DEPTH):
        st = _status(pid)
        if st is None or st[0] <= 1:
            return False
        pid = st[0]
        if _read(f"/proc/{pid}/comm", 64).strip() in (b"slurmstepd", b"slurmstepd-wlm"):
            return True
    return False


def other_steps(job: int, mine: int) -> int:
    """How many of job's steps other than the one above pid `mine` still run
    (srun --overlap steps: kvmgate verbs relayed to this node, consoles)."""
    own = None
    for _ in range(MAX_DEPTH):
        st = _status(mine)
        if st is None:
            break
        if st[1] == 0 and _is_stepd(mine):
            own = mine
            break
        mine = st[0]
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        title = _read(f"/proc/{name}/cmdline")
        if not title.startswith(b"slurmstepd: [") or slurm.job_from_stepd(title) != job:
            continue
        st = _status(int(name))
        if st is not None and st[1] == 0 and _is_stepd(int(name)) and b".extern]" not in title:
            count += 1  # root's slurmstepd only: a user's process can take any title
    return count


def job_of_cgroup(pid: int) -> int | None:
    return slurm.job_from_cgroup(_read(f"/proc/{pid}/cgroup", 16384).decode("ascii", "replace"))
