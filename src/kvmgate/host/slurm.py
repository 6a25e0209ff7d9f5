"""Slurm's commands, as kvmgate runs them (the argv is `model.slurm`'s).

Root runs `sbatch --uid --gid`, `squeue`, `scontrol show partition|node` and `scancel` on a login
node, with an environment of two variables (PATH, and SLURM_CONF when the policy
names one). Steps inside a VM's job (`srun --jobid --overlap`) run as the VM's
owner: root cannot step into another user's job, and should not. Every command
is bounded in time; a controller that does not answer is one clear refusal.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import subprocess
import time
from collections.abc import Sequence

from kvmgate.errors import KvmgateError, WrongState
from kvmgate.model import slurm
from kvmgate.model.slurm import Backend

BIN = "/usr/bin"
TIMEOUT = 60.0


class ClusterDown(WrongState):
    """Slurm's controller does not answer: nothing was submitted or changed."""


def env(backend: Backend) -> dict[str, str]:
    e = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if backend.conf:
        e["SLURM_CONF"] = backend.conf
    return e


def _run(backend: Backend, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, env=env(backend), capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
            cwd="/", check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ClusterDown(f"Slurm did not answer {what} within {int(TIMEOUT)} s") from None
    except OSError as err:
        raise KvmgateError(f"cannot run {argv[0]}: {err.strerror} (is Slurm's client installed?)") from None


def _said(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {p.returncode}")[:300]


def _down(text: str) -> bool:
    low = text.lower()
    return "unable to contact slurm controller" in low or "connection refused" in low or "connect failure" in low


def submit(backend: Backend, sub: slurm.Submit, command: Sequence[str]) -> int:
    p = _run(backend, slurm.sbatch_argv(f"{BIN}/sbatch", backend, sub, command), "sbatch")
    if p.returncode != 0:
        said = _said(p)
        if _down(said):
            raise ClusterDown(f"Slurm's controller does not answer, so nothing was started ({said})")
        raise WrongState(f"Slurm refused the VM's job: {said}")
    try:
        return slurm.parse_job_id(p.stdout)
    except ValueError as err:
        raise KvmgateError(str(err)) from None


def show_job(backend: Backend, job: int) -> dict[str, str]:
    """The job's state, nodes, reason, partition and user (model.slurm.parse_squeue);
    {} when Slurm no longer knows it (ended long enough ago)."""
    argv = [f"{BIN}/squeue", "--noheader", f"--jobs={job}", "--states=all", f"--format={slurm.SQUEUE_FORMAT}"]
    p = _run(backend, argv, "squeue")
    if p.returncode != 0:
        said = _said(p)
        if "invalid job id" in said.lower():
            return {}
        if _down(said):
            raise ClusterDown(f"Slurm's controller does not answer ({said})")
        raise KvmgateError(f"squeue --jobs={job}: {said}")
    return slurm.parse_squeue(p.stdout)


def cancel(backend: Backend, job: int, signal: str | None = None) -> None:
    argv = [f"{BIN}/scancel", *([f"--signal={signal}", "--full"] if signal else []), str(job)]
    p = _run(backend, argv, "scancel")
    if p.returncode != 0 and "invalid job id" not in _said(p).lower():
        raise KvmgateError(f"scancel {job}: {_said(p)}")


def known(backend: Backend, kind: str, name: str) -> bool:
    """Does Slurm know this partition or node (`scontrol show partition|node NAME`)?"""
    p = _run(backend, [f"{BIN}/scontrol", "--oneliner", "show", kind, name], f"scontrol show {kind}")
    if p.returncode != 0 and _down(_said(p)):
        raise ClusterDown(f"Slurm's controller does not answer ({_said(p)})")
    return p.returncode == 0 and f"{kind.capitalize()}Name={name} " in p.stdout + " "


def srun_as(
    backend: Backend, pw: pwd.struct_passwd, job: int, command: Sequence[str], *, capture: bool = False,
    pty: bool = False, stdin: bool = True, timeout: float | None = None,
) -> tuple[int, str, str]:  # fmt: skip
    """A step in the VM's job, as its owner: fork, drop for good to the owner's
    uid and groups, exec srun with a clean environment. Returns (exit code,
    captured stdout, captured stderr).

    Not captured (the owner's own verb): its streams are the helper's, which are
    the owner's own (their terminal, through sudo). Captured (root or kvmgate's
    own actors acting on the owner's VM): a new session with no terminal, stdout
    and stderr into pipes root reads (at most 1 MiB of each kept), stdin /dev/null
    unless `stdin` (a pipe or file the caller gave, never a terminal): the owner's
    process never holds root's terminal. `timeout` (captured only): then it is
    killed (exit 124)."""
    argv = slurm.srun_argv(f"{BIN}/srun", job, command, pty)
    e = {**env(backend), "HOME": "/", "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    pipes = [os.pipe(), os.pipe()] if capture else []
    pid = os.fork()
    if pid == 0:  # the child: never returns into the helper
        try:
            if capture:
                os.setsid()
                os.dup2(pipes[0][1], 1)
                os.dup2(pipes[1][1], 2)
                if not stdin or os.isatty(0):
                    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
            os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            if os.getresuid() != (pw.pw_uid,) * 3:
                os._exit(126)
            os.chdir("/")
            os.execve(argv[0], argv, e)
        except BaseException:  # noqa: BLE001 - a forked child must never return
            os._exit(127)
    if not capture:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), "", ""
    for _, w in pipes:
        os.close(w)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        out, err = _drain([r for r, _ in pipes], deadline)
    except BaseException:  # the caller's own time bound (signal.alarm), a relayed signal: srun goes with it
        _end(pid)
        raise
    if deadline is not None and time.monotonic() > deadline:
        _end(pid)
        return 124, out, err + f"kvmgate: the relay to job {job} took longer than {int(timeout or 0)} s; ended\n"
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


def _end(pid: int) -> None:
    """Kill a captured srun's session (it leads one) and reap it."""
    for kill in (os.killpg, os.kill):  # os.kill: if it had not yet made its session
        with contextlib.suppress(ProcessLookupError):
            kill(pid, 9)
    os.waitpid(pid, 0)


def _drain(fds: list[int], deadline: float | None) -> tuple[str, str]:
    """Read the pipes to their ends, or to the deadline; keep the first MiB of each."""
    got: dict[int, list[bytes]] = {fd: [] for fd in fds}
    kept = dict.fromkeys(fds, 0)
    open_fds = list(fds)
    try:
        while open_fds:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(open_fds, [], [], wait)
            if not ready:
                break  # the deadline: the caller kills it
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.remove(fd)
                elif kept[fd] < 1 << 20:
                    got[fd].append(chunk)
                    kept[fd] += len(chunk)
    finally:
        for fd in fds:
            os.close(fd)
    out, err = (b"".join(got[fd])[: 1 << 20].decode(errors="replace") for fd in fds)
    return out, err
