"""Slurm's commands, as kvmgate runs them (the argv is `model.slurm`'s).

Root runs `sbatch --uid --gid`, `scontrol show job` and `scancel` on a login
node, with an environment of two variables (PATH, and SLURM_CONF when the policy
names one). Steps inside a VM's job (`srun --jobid --overlap`) run as the VM's
owner: root cannot step into another user's job, and should not. Every command
is bounded in time; a controller that does not answer is one clear refusal.
"""

from __future__ import annotations

import os
import pwd
import subprocess
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
    """The job's fields; {} when Slurm no longer knows it (ended long enough ago)."""
    p = _run(backend, [f"{BIN}/scontrol", "--oneliner", "show", "job", str(job)], "scontrol show job")
    if p.returncode != 0:
        said = _said(p)
        if "invalid job id" in said.lower():
            return {}
        if _down(said):
            raise ClusterDown(f"Slurm's controller does not answer ({said})")
        raise KvmgateError(f"scontrol show job {job}: {said}")
    return slurm.parse_show_job(p.stdout)


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


def drained(backend: Backend, node: str) -> bool:
    """Is the node draining or drained (`scontrol update nodename=X state=drain`)?"""
    p = _run(backend, [f"{BIN}/sinfo", "--noheader", "--nodes", node, "--format=%T"], "sinfo")
    states = p.stdout.split()
    if p.returncode != 0 or not states:
        raise WrongState(f"Slurm knows no node {node[:64]!r}")
    return all(s.rstrip("*~#!%$@^-").startswith(("drain", "draining", "drained")) for s in states)


def srun_as(
    backend: Backend, pw: pwd.struct_passwd, job: int, command: Sequence[str], capture: bool = False, pty: bool = False
) -> tuple[int, str]:
    """A step in the VM's job, as its owner: fork, drop for good to the owner's
    uid and groups, exec srun with a clean environment. Its streams are the
    helper's (the caller's, through host.output) unless captured. Returns
    (exit code, captured stdout)."""
    argv = slurm.srun_argv(f"{BIN}/srun", job, command, pty)
    e = {**env(backend), "HOME": "/", "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    read_end = write_end = -1
    if capture:
        read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the helper
        try:
            if capture:
                os.dup2(write_end, 1)
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
            os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
            os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
            if os.getresuid() != (pw.pw_uid,) * 3:
                os._exit(126)
            os.chdir("/")
            os.execve(argv[0], argv, e)
        except BaseException:  # noqa: BLE001 - a forked child must never return
            os._exit(127)
    out = b""
    if capture:
        os.close(write_end)
        chunks, kept = [], 0
        while chunk := os.read(read_end, 65536):  # read to the end; keep the first MiB
            if kept < 1 << 20:
                chunks.append(chunk)
                kept += len(chunk)
        os.close(read_end)
        out = b"".join(chunks)[: 1 << 20]
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
