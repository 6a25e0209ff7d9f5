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
from collections.abc import Iterator
from pathlib import Path

SLURM_USER = "root"  # the daemons run as root: the suite's own, torn down with it


BRIDGE, NET = "kgslb0", "10.99.0"  # the two-node cluster's own network: the login host is .1, node i is .(2+i)


def conf(d: Path, host: str, nodes: list[str], ctld_port: int, node_port: int, spread: bool = False) -> str:
    """slurm.conf for a test cluster: job start in well under a second
    (batch_sched_delay=0), no cgroup plugin (proctrack/linuxproc: the node-side
    helper recognises its job by its slurmstepd ancestor), an unlimited partition."""
    lines = [
        "ClusterName=kvmgatetest",
        f"SlurmctldHost={host}({NET}.1)" if spread else f"SlurmctldHost={host}",
        f"SlurmUser={SLURM_USER}",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: a requeued job waits this long (default 120 s) before it runs again
        f"AuthInfo=cred_expire=10,socket={d}/munge/munge.socket",
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
        "PrivateData=jobs",  # docs/cluster.md: users see only their own jobs (and so not others' VMs)
        "JobAcctGatherType=jobacct_gather/none",
        "SlurmdParameters=config_overrides",  # 8 CPUs per node on a 2-core machine: jobs share the cores
    ]
    for i, n in enumerate(nodes):
        where = f"NodeAddr={NET}.{i + 2} NodeHostname={n} Port={node_port}" if spread else \
            f"NodeHostname={host} Port={node_port + i}"  # fmt: skip
        lines.append(f"NodeName={n} {where} CPUs=8 RealMemory=8000 State=UNKNOWN")
    lines.append(f"PartitionName=vms Nodes={','.join(nodes)} Default=YES MaxTime=UNLIMITED State=UP")
    lines.append(f"PartitionName=svc Nodes={','.join(nodes)} MaxTime=UNLIMITED State=UP")  # service VMs
    return "\n".join(lines) + "\n"


# PID 1 of a node's namespaces: its hostname, a private /run (the kvmgate runtime directory
# given) and /etc/hosts, slurmd, then reaping orphans until it is killed (which kills the node).
NODE_INIT = """
import os, socket, subprocess, sys
node, conf, run, hosts = sys.argv[1:5]
socket.sethostname(node)
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
os.makedirs(run, 0o700)
subprocess.run(["/usr/sbin/slurmd", "-f", conf, "-N", node], check=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        import time
        time.sleep(1)
"""


def _zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


class Cluster:
    def __init__(
        self, d: Path, nodes: list[str], ctld_port: int = 26817, node_port: int = 26818, spread: bool = False,
        run: str = "",
    ) -> None:  # fmt: skip
        """spread: each node in its own network, UTS, mount and PID namespaces (two-node tests),
        with `run` (kvmgate's runtime directory) private to it."""
        self.d, self.nodes, self.spread, self.kvm_run = d, nodes, spread, run
        self.inits: dict[str, int] = {}
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(d / "slurm.conf")}
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged runs as munge; users reach its socket
        for sub in ("ctld", "spool", "run", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = os.uname().nodename
        (d / "slurm.conf").write_text(conf(d, host, nodes, ctld_port, node_port, spread))
        os.chmod(d / "slurm.conf", 0o644)

    @contextlib.contextmanager
    def running(self) -> Iterator[Cluster]:
        """Started, and stopped (jobs, daemons, namespaces, files) however the tests end."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def policy(self, base: str, *extra: str) -> str:
        """A kvmgate policy whose VMs run on this cluster."""
        lines = ['kind = "slurm"', 'partition = "vms"', f'conf = "{self.d}/slurm.conf"', "overhead_mib = 128", *extra]
        return base + "[backend]\n" + "".join(f"{ln}\n" for ln in lines)

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
        if self.spread:
            self._network()
        self.start_controller()
        for n in self.nodes:
            if self.spread:
                self.start_node(n)
            else:
                subprocess.run(["/usr/sbin/slurmd", "-f", self.env["SLURM_CONF"], "-N", n], check=True, env=self.env)
        if wait:
            self.wait_idle()

    def _network(self) -> None:
        ip = ["ip", "link"]
        subprocess.run([*ip, "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE], check=True)
        subprocess.run([*ip, "set", BRIDGE, "up"], check=True)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{NET}.{i + 2} {n}\n" for i, n in enumerate(self.nodes))
        hosts += f"{NET}.1 {os.uname().nodename}\n"
        (self.d / "hosts").write_text(hosts)
        os.chmod(self.d / "hosts", 0o644)
        for i, _ in enumerate(self.nodes):
            ns = f"kgn{i}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run([*ip, "add", f"kgsv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
            subprocess.run([*ip, "set", f"kgsv{i}", "master", BRIDGE, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{NET}.{i + 2}/24", "dev", "eth0"], check=True)
            for dev in ("eth0", "lo"):
                subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)

    def start_node(self, node: str) -> None:
        """The node's namespaces and slurmd; its PID 1 is remembered (kill_node ends it all)."""
        i = self.nodes.index(node)
        (self.d / "spool" / node).mkdir(parents=True, exist_ok=True)
        argv = ["nsenter", f"--net=/run/netns/kgn{i}", "unshare", "--uts", "--mount", "--pid", "--fork",
                "--mount-proc", "--propagation", "private", "python3", "-I", "-c", NODE_INIT, node,
                self.env["SLURM_CONF"], self.kvm_run, str(self.d / "hosts")]  # fmt: skip
        p = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            kids = [int(k) for k in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
            if kids:
                self.inits[node] = kids[0]
                break
            assert time.monotonic() < deadline, "the node's namespaces did not start"
            time.sleep(0.05)
        self.launchers = [*getattr(self, "launchers", []), p]

    def kill_node(self, node: str) -> None:
        """The node dies: its PID 1 killed, and with it slurmd, its steps and their QEMUs."""
        pid = self.inits.pop(node)
        ns = os.readlink(f"/proc/{pid}/ns/pid")
        members = []
        for p in Path("/proc").iterdir():  # everything in the node's PID namespace: slurmd, steps, QEMUs
            with contextlib.suppress(OSError, ValueError):
                if p.name.isdigit() and os.readlink(p / "ns" / "pid") == ns:
                    members.append(int(p.name))
        for member in [pid, *members]:
            with contextlib.suppress(OSError):
                os.kill(member, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{m}") and not _zombie(m) for m in [pid, *members]):
            assert time.monotonic() < deadline, "the node's processes did not die"
            time.sleep(0.05)

    def on_node(self, node: str, argv: list[str], user: str | None = None) -> list[str]:
        """argv as run inside the node's namespaces (as `user`, if given)."""
        enter = ["nsenter", "-t", str(self.inits[node]), "-n", "-m", "-u", "-p"]
        return [*enter, *(["/usr/sbin/runuser", "-u", user, "--"] if user else []), *argv]

    def node_state(self, node: str) -> str:
        # Every node's line (sinfo --nodes X aggregates what X shares with others: "mixed*" for a down node)
        rows = [ln.split() for ln in self.run("sinfo", "--Node", "--noheader", "--format=%N %T").stdout.splitlines()]
        return next((r[1] for r in rows if len(r) == 2 and r[0] == node), "")

    def diagnose(self) -> str:
        """What the daemons say, for a failing test's message."""
        info = self.run("sinfo", "-N", "-o", "%N %T %E").stdout
        log = (self.d / "log" / "slurmctld.log").read_text(errors="replace").splitlines()[-15:]
        return info + "\n".join(log)

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
        own = (
            ["slurmctld.pid"] if self.spread else [p.name for p in (self.d / "run").glob("*.pid")]
        )  # nodes: their PID 1
        for pidfile in [*(self.d / "run" / name for name in sorted(own)), self.d / "munge" / "munged.pid"]:
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
        for node in list(self.inits):
            self.kill_node(node)
        for launcher in getattr(self, "launchers", []):
            launcher.wait(timeout=10)
        if self.spread:
            for i, _ in enumerate(self.nodes):
                subprocess.run(["ip", "netns", "del", f"kgn{i}"], capture_output=True)
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        shutil.rmtree(self.d, ignore_errors=True)
