"""The Slurm backend on a one-node cluster the suite starts itself (issue 14):
munged, slurmctld and slurmd by hand, kvmgate's policy pointing at them. Every
VM is a job that runs as its owner; the verbs reach it through Slurm; the
refusals are real attacks by real users (their own job running the node side,
a forged environment, a second start from inside the VM's own job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, DEFAULT_POLICY, HELPER, Kvmgate, as_user, boot_options
from .slurm_cluster import Cluster
from .test_hibernate import guest_run, uptime

SLURM_DIR = Path("/opt/kvmgate-slurm-test")


@pytest.fixture(scope="module")
def cluster(kg: Kvmgate) -> Iterator[Cluster]:
    with Cluster(SLURM_DIR, ["kg-a"]).running() as c:
        yield c


@pytest.fixture
def on_slurm(kg: Kvmgate, cluster: Cluster) -> Iterator[Cluster]:
    kg.write_policy(cluster.policy(DEFAULT_POLICY))
    yield cluster
    # every job of the test ended, and kvmgate saw it: nothing left for the next test
    cluster.run("scancel", "--full", "--partition=vms")


def jobs_of(cluster: Cluster, user: str) -> list[tuple[str, str, str]]:
    out = cluster.run("squeue", "--noheader", "--user", user, "--format=%i %j %T").stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def wait_for(what: str, check, seconds: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def make_vm(kg: Kvmgate, owner: str, name: str, guest: Path, cleanup_vms: list) -> None:
    kg.ok("admin", "create", name, "--owner", owner, "--", *boot_options(guest))
    cleanup_vms.append((owner, name))


def chain(pid: int) -> list[tuple[int, int, str]]:
    """(pid, real uid, name) from pid up to init."""
    out = []
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        out.append((pid, uid, name))
        pid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return out


def test_a_vm_is_a_job_of_its_owner_and_every_verb_reaches_it(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    out = kg.ok("start", vm_name, user=alice).stdout
    m = re.match(rf"started {vm_name} on node kg-a \(job (\d+), pid (\d+), accel tcg\)", out)
    assert m, out
    job, pid = m.group(1), int(m.group(2))
    st = kg.json("status", vm_name, user=alice)
    assert st["state"] == "running" and st["node"] == "kg-a" and st["job_id"] == int(job)
    assert st["pid"] == pid
    rows = jobs_of(on_slurm, alice)
    assert len(rows) == 1 and rows[0][0] == job and rows[0][1].startswith("kvmgate-") and rows[0][2] == "RUNNING"
    # QEMU is the foreground child of the job's own step, as the owner: sudo's helper, then slurmstepd.
    up = chain(pid)
    assert up[0][1] == int(subprocess.run(["id", "-u", alice], capture_output=True, text=True).stdout)
    assert up[1][2] == HELPER or "python" in up[1][2], up
    stepd = next(p for p in up if "slurmstepd" in Path(f"/proc/{p[0]}/cmdline").read_text())
    assert f"[{job}.batch]" in Path(f"/proc/{stepd[0]}/cmdline").read_text()
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    guest_run(kg, alice, vm_name, "echo slurm-marker > /m; echo wr''ote", "wrote")
    # Root's console of her VM, relayed through her job: the guest's control bytes reach root's terminal
    # shown, not obeyed (an OSC title sequence here), as on the local backend.
    r = kg("console", "--owner", alice, vm_name, "--expect", "osc-done", "--timeout", "30",
           input="printf 'x\\033]0;owned\\007y'; echo osc''-done\n")  # fmt: skip
    assert r.returncode == 0 and "osc-done" in r.stdout, r.stderr + r.stdout
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, repr(r.stdout[-300:])
    kg.ok("freeze", vm_name, user=alice)
    assert kg.json("status", vm_name, user=alice)["state"] == "paused"
    kg.ok("thaw", vm_name, user=alice)
    assert kg.json("status", vm_name, user=alice)["state"] == "running"
    assert [r["state"] for r in kg.json("list", user=alice) if r["name"] == vm_name] == ["running"]
    before = uptime(kg, alice, vm_name)
    assert "hibernated" in kg.ok("hibernate", vm_name, user=alice).stdout
    wait_for("the job to end", lambda: not jobs_of(on_slurm, alice))
    st = kg.json("status", vm_name, user=alice)
    assert st["state"] == "hibernated" and st["node"] is None and st["job_id"] is None
    out = kg.ok("start", vm_name, user=alice).stdout
    assert out.startswith(f"restored {vm_name} on node kg-a"), out
    after = uptime(kg, alice, vm_name)
    assert before <= after < before + 2.0, (before, after)
    guest_run(kg, alice, vm_name, "cat /m", "slurm-marker")
    r = kg("start", vm_name, user=alice)
    assert r.returncode == 5 and "already running (on node kg-a" in r.stderr
    assert "stopped" in kg.ok("stop", vm_name, "--force", user=alice).stdout
    wait_for("the job to end", lambda: not jobs_of(on_slurm, alice))
    st = kg.json("status", vm_name, user=alice)
    assert st["state"] == "stopped" and st["last_run"]["how"] == "quit"


def test_the_node_side_starts_nothing_outside_the_vms_own_job(
    kg: Kvmgate, on_slurm: Cluster, alice: str, bob: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    entry = ["/usr/bin/sudo", "-n", HELPER, "slurm-job", vm_name]
    conf = str(SLURM_DIR / "slurm.conf")
    directory = kg.json("status", vm_name, user=alice)["directory"]
    # A job that holds nearly all of the node's memory keeps the VM's job pending, its record unclaimed.
    blocker = on_slurm.run("sbatch", "--parsable", "--mem=7800M", "--output=/dev/null", "--wrap", "sleep 600")
    assert blocker.returncode == 0, blocker.stderr
    wait_for("the blocker to run", lambda: "RUNNING" in on_slurm.run("squeue", "-h", "-o", "%T").stdout)
    # Her own job, which will run the node side as soon as the VM's job waits (it fits beside the blocker).
    out, go = Path(f"/home/{alice}/own-{vm_name}.out"), Path(f"/home/{alice}/go-{vm_name}")
    script = f"while [ ! -e {go} ]; do sleep 0.1; done; exec {' '.join(entry)}"
    r = on_slurm.run("sbatch", "--parsable", "--mem=50M", f"--output={out}", "--wrap", script, user=alice)
    assert r.returncode == 0, r.stderr
    own = r.stdout.strip()
    wait_for(
        "her job to run", lambda: [row for row in jobs_of(on_slurm, alice) if row[0] == own and row[2] == "RUNNING"]
    )
    started: list[subprocess.CompletedProcess[str]] = []
    t = threading.Thread(target=lambda: started.append(kg("start", vm_name, user=alice)))
    t.start()
    try:
        job = wait_for("the VM's job", lambda: [r[0] for r in jobs_of(on_slurm, alice) if r[2] == "PENDING"])[0]
        assert json.loads(Path(directory, "job.json").read_text())["state"] == "submitted"
        # Outside any job, with every variable Slurm sets naming the VM's job.
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_CONF": conf,
               "SLURM_JOB_USER": alice, "SLURM_STEP_ID": "0"}  # fmt: skip
        r = as_user(alice, entry, env=env)
        assert r.returncode == 3 and "not running inside a Slurm job" in r.stderr, r.stderr
        as_user(alice, ["touch", str(go)])
        wait_for("her job to end", lambda: own not in [row[0] for row in jobs_of(on_slurm, alice)])
        assert f"job {own} is not the job kvmgate submitted" in out.read_text()
        # Bob, with his own job and a forged environment: the VM is not his (and not there).
        r = as_user(bob, entry, env={**env, "SLURM_JOB_USER": bob})
        assert r.returncode == 4 and "no such vm" in r.stderr.lower(), r.stderr
        assert json.loads(Path(directory, "job.json").read_text())["state"] == "submitted", "nothing claimed it"
        assert kg.json("status", vm_name, user=alice)["state"] == "starting"
    finally:
        on_slurm.run("scancel", blocker.stdout.strip())
        t.join()
    assert started[0].returncode == 0, started[0].stderr
    assert kg.json("status", vm_name, user=alice)["state"] == "running"
    # Inside the VM's real job: the record was claimed once, a second start is refused.
    r = on_slurm.run("srun", f"--jobid={job}", "--overlap", "--export=NONE", *entry, user=alice)
    assert r.returncode != 0 and "started this VM already" in r.stderr, r.stderr
    r = on_slurm.run("srun", f"--jobid={job}", "--overlap", "--export=NONE", "true", user=bob)
    assert r.returncode != 0, "Slurm itself keeps bob out of alice's job"
    seen = on_slurm.run("squeue", "--noheader", "--all", "--format=%i", user=bob)
    assert seen.returncode == 0 and job not in seen.stdout.split(), "PrivateData=jobs: bob sees none of her jobs"
    assert len(jobs_of(on_slurm, alice)) == 1
    assert kg.json("status", vm_name, user=alice)["state"] == "running"


def test_a_job_slurm_ends_is_recorded(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    kg.ok("start", vm_name, user=alice)
    job = kg.json("status", vm_name, user=alice)["job_id"]
    on_slurm.run("scancel", str(job))
    wait_for("the job to end", lambda: not jobs_of(on_slurm, alice))
    st = wait_for("stopped", lambda: (s := kg.json("status", vm_name, user=alice))["state"] == "stopped" and s)
    assert "ended by Slurm on node kg-a" in st["last_run"]["how"] and str(job) in st["last_run"]["how"]
    assert "ended by Slurm" in kg.ok("log", vm_name, user=alice).stdout
    kg.ok("start", vm_name, user=alice)  # and it starts again


def test_one_job_however_many_start_at_once(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    results: list[subprocess.CompletedProcess[str]] = []

    def start() -> None:
        results.append(kg("start", vm_name, user=alice))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.returncode for r in results) == [0, 5, 5], [(r.returncode, r.stderr) for r in results]
    assert len(jobs_of(on_slurm, alice)) == 1


def test_a_start_while_the_controller_is_down_is_refused_and_changes_nothing(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    directory = kg.json("status", vm_name, user=alice)["directory"]
    on_slurm.stop_controller()
    try:
        r = kg("start", vm_name, user=alice, timeout=200)
        assert r.returncode == 5 and "controller does not answer" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        assert not os.path.exists(os.path.join(directory, "job.json"))
        assert kg.json("status", vm_name, user=alice)["state"] == "stopped"
    finally:
        on_slurm.start_controller()


def test_the_backend_switch_is_refused_while_a_vm_runs(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    kg.ok("start", vm_name, user=alice)
    policy = Path(kg_policy_path()).read_text()
    r = kg("admin", "init", "--backend", "local")
    assert r.returncode == 5 and "before switching the backend" in r.stderr
    assert Path(kg_policy_path()).read_text() == policy
    # Unknown partitions and nodes: one line each, nothing changed (the VM is not even hibernated).
    for argv, why in (
        (["admin", "init", "--backend", "slurm", "--partition", "nosuch"], "Slurm knows no partition 'nosuch'"),
        (["admin", "init", "--backend", "slurm", "--partition", 'vms"\nqos = "x'], "must be a Slurm name"),
        (["admin", "move", vm_name, "--owner", alice, "--to", "kg-z"], "Slurm knows no node 'kg-z'"),
        (["admin", "evacuate", "kg-z"], "Slurm knows no node 'kg-z'"),
    ):
        r = kg(*argv)
        assert r.returncode in (2, 3) and why in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)
    assert Path(kg_policy_path()).read_text() == policy
    assert kg.json("status", vm_name, user=alice)["state"] == "running"
    kg.ok("stop", vm_name, "--force", user=alice)
    kg.ok("admin", "init", "--backend", "local")  # no VM of the suite's is left hibernated (conftest.discard)
    assert 'kind = "local"' in Path(kg_policy_path()).read_text()
    kg.ok("admin", "init", "--backend", "slurm", "--partition", "vms")
    text = Path(kg_policy_path()).read_text()
    assert 'kind = "slurm"' in text and 'partition = "vms"' in text and f'conf = "{SLURM_DIR}/slurm.conf"' in text


def kg_policy_path() -> str:
    from ..conftest import ETC

    return f"{ETC}/policy.toml"
