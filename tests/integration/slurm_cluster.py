"""A Slurm cluster the suite starts and tears down itself (issue 14): its own munged
(key, socket, pid and log in a private directory, so the host's munge is never
touched), slurmctld and one slurmd per node, all from one generated slurm.conf.
No systemd: the daemons are started by hand, as on this machine.

Nodes share the host here (MULTIPLE_SLURMD is in Debian's build): each has its
own NodeName, port, spool, pid and log file (%n). The two-node tests put each
slurmd in its own network namespace as well.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

SLURM_USER = "root"  # the daemons run as root: the suite's own, torn down with it


def conf(d: Path, host: str, nodes: list[str], ctld_port: int, node_port: int) -> str:
    """slurm.conf for a test cluster: job start in well under a second
    (batch_sched_delay=0), no cgroup plugin (proctrack/linuxproc: the node-side
    helper recognises its job by its slurmstepd ancestor), an unlimited partition."""
    lines = [
        "ClusterName=kvmgatetest",
        f"SlurmctldHost={host}",
        f"SlurmUser={SLURM_USER}",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d}/munge/munge.socket",
        f"StateSaveLocation={d}/ctld",
        f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/run/slurmctld.pid",
        f"SlurmdPidFile={d}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=batch_sched_delay=0",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "SlurmdTimeout=10",
        "KillWait=60",
        "JobAcctGatherType=jobacct_gather/none",
    ]
    for i, n in enumerate(nodes):
        lines.append(f"NodeName={n} NodeHostname={host} Port={node_port + i} CPUs=2 RealMemory=8000 State=UNKNOWN")
    lines.append(f"PartitionName=vms Nodes={','.join(nodes)} Default=YES MaxTime=UNLIMITED State=UP")
    return "\n".join(lines) + "\n"


class Cluster:
    def __init__(self, d: Path, nodes: list[str], ctld_port: int = 26817, node_port: int = 26818) -> None:
        self.d, self.nodes = d, nodes
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(d / "slurm.conf")}
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged runs as munge; users reach its socket
        for sub in ("ctld", "spool", "run", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = os.uname().nodename
        (d / "slurm.conf").write_text(conf(d, host, nodes, ctld_port, node_port))

    def start(self, wait: bool = True) -> None:
        munge = pwd.getpwnam("munge")
        m = self.d / "munge"
        os.chown(m, munge.pw_uid, munge.pw_gid)
        os.chmod(m, 0o700)
        subprocess.run(["mungekey", "-c", "-f", "-k", str(m / "key")], check=True)
        os.chown(m / "key", munge.pw_uid, munge.pw_gid)
        subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--key-file={m}/key", f"--socket={m}/munge.socket",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed", "--force"],
            check=True,
        )  # fmt: skip
        os.chmod(m, 0o755)  # users' srun and sbatch reach the socket
        self.start_controller()
        for n in self.nodes:
            subprocess.run(["/usr/sbin/slurmd", "-f", self.env["SLURM_CONF"], "-N", n], check=True, env=self.env)
        if wait:
            self.wait_idle()

    def start_controller(self) -> None:
        subprocess.run(["/usr/sbin/slurmctld", "-f", self.env["SLURM_CONF"]], check=True, env=self.env)
        deadline = time.monotonic() + 30
        while self.run("scontrol", "ping").stdout.count("UP") < 1:
            assert time.monotonic() < deadline, "slurmctld did not come up"
            time.sleep(0.2)

    def stop_controller(self) -> None:
        pid = int((self.d / "run" / "slurmctld.pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_idle(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            out = self.run("sinfo", "-h", "-o", "%t").stdout.split()
            if out and all(s == "idle" for s in out):
                return
            assert time.monotonic() < deadline, f"the nodes never came up: {out}"
            time.sleep(0.3)

    def run(self, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = (
            list(argv)
            if user is None
            else ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in self.env.items()), *argv]
        )
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)

    def stop(self) -> None:
        """Every job cancelled, then the daemons ended (SIGKILL after 10 s), then the files."""
        self.run("scancel", "--full", "--partition=vms")
        pids = []
        for pidfile in [*sorted((self.d / "run").glob("*.pid")), self.d / "munge" / "munged.pid"]:
            try:
                pids.append(int(pidfile.read_text().split()[0]))
                os.kill(pids[-1], signal.SIGTERM)
            except (OSError, ValueError):
                continue
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(self.d, ignore_errors=True)
