"""The Slurm backend against the local one, in one run (issue 14).

    sudo .venv/bin/python bench/slurm.py [--runs N]

Set-up (the benchmark's own): the standard installation (`install.sh`, `admin
init`), the bench user, and a two-node Slurm cluster on this machine, each
slurmd in its own network, UTS, mount and PID namespaces
(tests/integration/slurm_cluster.py, the suite's own), tuned as docs/cluster.md
says (batch_sched_delay=0, no prolog, SlurmdTimeout 10).

Measured, interleaved run by run, with the same VM (test guest, -m 256, TCG):
- start: `kvmgate start` as the VM's owner until it returns (QEMU answers QMP),
  on the local backend and through Slurm; and, as the floor of what Slurm adds,
  a trivial job's `sbatch` to RUNNING as seen by `squeue`;
- move: `kvmgate hibernate` (until the job is gone), then `kvmgate start` (a
  restore) of the booted VM, on the same node and on the other node (the one it
  left drained); and the same hibernate and restore on the local backend.
"""

from __future__ import annotations

import argparse
import atexit
import statistics
import sys
import time
from pathlib import Path

from common import BOOT, GUEST_BOOT_LINE, KVMGATE, POLICY, REPO, USER, define, setup, sh

sys.path.insert(0, str(REPO))
from tests.integration.slurm_cluster import Cluster

VM = "benchslurm"
NODES = ["kg-a", "kg-b"]
CLUSTER = Path("/opt/kvmgate-slurm-bench")


def as_user(*args: str) -> float:
    t = time.perf_counter()
    sh("runuser", "-u", USER, "--", KVMGATE, *args)
    return (time.perf_counter() - t) * 1000


def backend(original: str, slurm: bool) -> None:
    extra = f'\n[backend]\nkind = "slurm"\npartition = "vms"\nconf = "{CLUSTER}/slurm.conf"\n' if slurm else ""
    POLICY.write_text(original + extra)


def status() -> dict:
    import json

    return json.loads(sh(KVMGATE, "status", VM, "--owner", USER, "--json").stdout)  # type: ignore[no-any-return]


def node_of() -> str:
    return str(status()["node"])


def stamp(line: str) -> float:
    """A Slurm log line's [YYYY-MM-DDTHH:MM:SS.mmm] as seconds."""
    import datetime

    return datetime.datetime.fromisoformat(line[1:24]).timestamp()


def where_time_goes(jobs: dict[str, list[str]]) -> list[str]:
    """From the daemons' own logs: sbatch's RPC to the allocation (the scheduler), the allocation to
    slurmd launching the batch script (the node)."""
    logs = [*CLUSTER.joinpath("log").glob("slurm*.log")]
    text = "".join(p.read_text(errors="replace") for p in logs)
    out = []
    for label, ids in jobs.items():
        sched, launch = [], []
        for j in ids:
            sub = [ln for ln in text.splitlines() if f"_slurm_rpc_submit_batch_job: JobId={j} " in ln]
            alloc = [ln for ln in text.splitlines() if f"sched: Allocate JobId={j} " in ln]
            run = [ln for ln in text.splitlines() if f"Launching batch job {j} " in ln]
            if sub and alloc and run:
                sched.append((stamp(alloc[0]) - stamp(sub[0])) * 1000)
                launch.append((stamp(run[0]) - stamp(alloc[0])) * 1000)
        if sched:
            out.append(f"{label}: submission to allocation {statistics.median(sched):.0f} ms, "
                       f"allocation to the batch script on its node {statistics.median(launch):.0f} ms")  # fmt: skip
    return out


def trivial_job(c: Cluster) -> float:
    t = time.perf_counter()
    job = c.run("sbatch", "--parsable", f"--uid={USER}", "--gid=" + sh("id", "-g", USER).stdout.strip(),
                "--output=/dev/null", "--wrap", "sleep 5").stdout.strip()  # fmt: skip
    while "RUNNING" not in c.run("squeue", "-h", "-j", job, "-o", "%T").stdout:
        time.sleep(0.005)
    ms = (time.perf_counter() - t) * 1000
    c.run("scancel", job)
    return ms


def line(title: str, base: list[float], ours: list[float]) -> str:
    mb, mo = statistics.median(base), statistics.median(ours)
    return f"{title}: {mb:.0f} ms -> {mo:.0f} ms (n={len(ours)}), ratio {mo / mb:.2f}x, {mo - mb:+.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    setup()
    original = POLICY.read_text()
    atexit.register(POLICY.write_text, original)
    define(VM, "-m", "256", "-nographic", *BOOT)
    cluster = Cluster(CLUSTER, NODES, ctld_port=27017, node_port=27018, spread=True, run="/run/kvmgate")
    cluster.start()
    atexit.register(cluster.stop)
    local, slurm, job = [], [], []
    same, other, local_hib, local_res, hib = [], [], [], [], []
    jobs: dict[str, list[str]] = {"start": [], "restore, same node": [], "restore, other node": []}
    for _ in range(args.runs):
        backend(original, False)
        local.append(as_user("start", VM))
        sh(KVMGATE, "console", VM, "--owner", USER, "--expect", GUEST_BOOT_LINE, "--timeout", "60")
        t = as_user("hibernate", VM)
        local_hib.append(t)
        local_res.append(as_user("start", VM))
        sh(KVMGATE, "stop", VM, "--owner", USER, "--force")
        backend(original, True)
        job.append(trivial_job(cluster))
        slurm.append(as_user("start", VM))
        jobs["start"].append(str(status()["job_id"]))
        sh(KVMGATE, "console", VM, "--owner", USER, "--expect", GUEST_BOOT_LINE, "--timeout", "60")
        for bucket, drain_other in ((same, True), (other, False)):
            here = node_of()
            target = next(n for n in NODES if n != here)
            drained = target if drain_other else here  # the node the restore must not go to
            cluster.run("scontrol", "update", f"nodename={drained}", "state=drain", "reason=bench")
            hib.append(as_user("hibernate", VM))
            bucket.append(as_user("start", VM))
            jobs["restore, same node" if drain_other else "restore, other node"].append(str(status()["job_id"]))
            cluster.run("scontrol", "update", f"nodename={drained}", "state=resume")
            assert (node_of() == here) == drain_other
        sh(KVMGATE, "stop", VM, "--owner", USER, "--force")
    print(f"# kvmgate on Slurm: {args.runs} runs, medians")
    print(line("start, local backend -> through Slurm", local, slurm))
    print(f"a trivial job, sbatch to RUNNING: {statistics.median(job):.0f} ms")
    print(
        f"local backend: hibernate {statistics.median(local_hib):.0f} ms, restore {statistics.median(local_res):.0f} ms"
    )
    print(f"through Slurm: hibernate {statistics.median(hib):.0f} ms (until the job is gone)")
    print(line("restore, local backend -> through Slurm on the same node", local_res, same))
    print(line("restore through Slurm, same node -> the other node", same, other))
    print("where the time goes (medians, from slurmctld's and slurmd's logs):")
    for text in where_time_goes(jobs):
        print("  " + text)


if __name__ == "__main__":
    main()
