"""The Slurm backend's pure parts: the policy table, sbatch's and srun's argv, and
recognising a job from a process's cgroup or its slurmstepd ancestor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.errors import PolicyError
from kvmgate.model import slurm as sl

BACKEND = sl.parse_backend({"kind": "slurm", "partition": "vms", "account": "lab", "features": ["kvm", "avx2"]})


def test_the_backend_table_is_strict() -> None:
    assert sl.parse_backend({}) == sl.Backend()
    assert BACKEND.slurm and BACKEND.features == ("kvm", "avx2")
    for bad in (
        {"kind": "k8s"},
        {"kind": "slurm"},
        {"kind": "slurm", "partition": "vms;rm"},
        {"kind": "slurm", "partition": "vms", "features": ["a&b"]},
        {"kind": "slurm", "partition": "vms", "qos": "--uid=0"},
        {"kind": "slurm", "partition": "vms", "overhead_mib": 1},
        {"kind": "slurm", "partition": "vms", "cpu_model": "host,+vmx;x"},
        {"kind": "slurm", "partition": "vms", "extra": 1},
    ):
        with pytest.raises(PolicyError):
            sl.parse_backend(bad)


def test_sbatch_runs_the_job_as_the_owner_with_their_group_and_no_environment() -> None:
    job = ["/usr/bin/sudo", "-n", "/usr/lib/kvmgate/kvmgate-helper", "slurm-job", "web"]
    argv = sl.sbatch_argv("/usr/bin/sbatch", BACKEND, sl.Submit("KEY123", 1001, 1001, 512, 2), job)
    assert argv[0] == "/usr/bin/sbatch" and "--parsable" in argv
    assert "--uid=1001" in argv and "--gid=1001" in argv, "22.05 would run it with gid 0 otherwise"
    assert "--export=NONE" in argv and "--chdir=/" in argv and "--time=UNLIMITED" in argv
    assert "--mem=768M" in argv and "--cpus-per-task=2" in argv and "--no-requeue" in argv
    assert "--constraint=kvm&avx2" in argv and "--account=lab" in argv and "--partition=vms" in argv
    assert argv[-1] == "--wrap=exec /usr/bin/sudo -n /usr/lib/kvmgate/kvmgate-helper slurm-job web"
    assert "--job-name=kvmgate-KEY123" in argv
    for bad in (["sh", "-c", "id; rm"], ["a b"], ["$(id)"], []):
        with pytest.raises(ValueError):
            sl.sbatch_argv("sbatch", BACKEND, sl.Submit("K", 1, 1, 64, 1), bad)
    svc = sl.sbatch_argv("sbatch", BACKEND._replace(service_partition="svc"), sl.Submit("K", 1, 1, 64, 1, True), ["e"])
    assert "--requeue" in svc and "--partition=svc" in svc
    pinned = sl.sbatch_argv("sbatch", BACKEND, sl.Submit("K", 1, 1, 64, 1, node="node-b"), ["e"])
    assert "--nodelist=node-b" in pinned
    away = sl.sbatch_argv("sbatch", BACKEND, sl.Submit("K", 1, 1, 64, 1, exclude="node-a"), ["e"])
    assert "--exclude=node-a" in away
    with pytest.raises(PolicyError):
        sl.sbatch_argv("sbatch", BACKEND, sl.Submit("K", 1, 1, 64, 1, node="a,b"), ["e"])
    with pytest.raises(ValueError):
        sl.sbatch_argv("sbatch", sl.Backend(), sl.Submit("K", 1, 1, 64, 1), ["e"])


def test_srun_overlaps_the_vms_step() -> None:
    argv = sl.srun_argv("/usr/bin/srun", 42, ["/usr/lib/kvmgate/node", "console", "K"], pty=True)
    assert argv[:3] == ["/usr/bin/srun", "--jobid=42", "--overlap"] and "--pty" in argv
    assert argv[-3:] == ["/usr/lib/kvmgate/node", "console", "K"] and "--export=NONE" in argv


@pytest.mark.parametrize(("out", "job"), [("123\n", 123), ("77;cluster\n", 77)])
def test_the_job_id_sbatch_prints(out: str, job: int) -> None:
    assert sl.parse_job_id(out) == job


@pytest.mark.parametrize("out", ["", "Submitted batch job 5", "-1", "٣", "99999999999"])
def test_anything_else_is_no_job_id(out: str) -> None:
    with pytest.raises(ValueError):
        sl.parse_job_id(out)


def test_a_job_from_its_cgroup_v2_and_v1() -> None:
    v2 = "0::/system.slice/slurmstepd.scope/job_812/step_batch/user/task_0\n"
    assert sl.job_from_cgroup(v2) == 812
    v1 = "12:freezer:/slurm/uid_1001/job_9/step_batch\n11:memory:/slurm/uid_1001/job_9/step_batch/task_0\n"
    assert sl.job_from_cgroup(v1, 1001) == 9
    assert sl.job_from_cgroup(v1, 1002) is None, "another user's job"
    assert sl.job_from_cgroup("0::/user.slice/user-1001.slice/session-3.scope\n") is None


@given(st.text(max_size=200))
def test_nothing_but_slurms_shapes_names_a_job(text: str) -> None:
    got = sl.job_from_cgroup(text)
    assert got is None or "job_" in text


def test_a_job_from_slurmstepds_title() -> None:
    assert sl.job_from_stepd(b"slurmstepd: [812.batch]\0") == 812
    assert sl.job_from_stepd(b"slurmstepd: [812.0]") == 812
    assert sl.job_from_stepd(b"/bin/sh\0-c\0slurmstepd: [1.batch]") is None
    assert sl.job_from_stepd(b"slurmstepd: [812.batch] extra") is None


def test_the_policy_carries_the_backend() -> None:
    from kvmgate.model.policy.policy import Policy

    assert Policy.from_dict({}).backend == sl.Backend()
    p = Policy.from_dict({"backend": {"kind": "slurm", "partition": "vms"}})
    assert p.backend.slurm and p.backend.partition == "vms"
    with pytest.raises(PolicyError):
        Policy.from_dict({"backend": {"kind": "slurm"}})


REC = sl.JobRecord(812, "KEY", 1001, 1_700_000_000, ("-smp", "2"))


def test_the_job_record_reads_back_strictly() -> None:
    assert sl.parse_record(REC.to_json()) == REC
    running = REC._replace(state="running", node="node-a", pid=77, accel="tcg")
    assert sl.parse_record(running.to_json()) == running
    for bad in (
        '{"version": 2}', "[]", "x",
        REC.to_json().replace('"job": 812', '"job": true'),
        REC.to_json().replace('"state": "submitted"', '"state": "done"'),
        REC.to_json().replace('"options": ["-smp", "2"]', '"options": ["-smp", 2]'),
        REC._replace(node="a b").to_json(),
        REC._replace(options=("x" * 70000,)).to_json(),
        REC._replace(accel="hvf").to_json(),
    ):  # fmt: skip
        with pytest.raises(sl.NotThisJob):
            sl.parse_record(bad)


BATCH = sl.Seen(812, "batch", 1001, ("/usr/bin/sudo",))


def test_a_record_once_claimed_is_claimed_again_only_by_a_requeued_batch_step() -> None:
    assert sl.check_caller(REC, "KEY", 1001, BATCH, "/usr/bin/sudo") is False
    for state in ("starting", "running"):
        with pytest.raises(sl.NotThisJob, match="started this VM already"):
            sl.check_caller(REC._replace(state=state), "KEY", 1001, BATCH._replace(step="0"), "/usr/bin/sudo")
        assert sl.check_caller(REC._replace(state=state), "KEY", 1001, BATCH, "/usr/bin/sudo") is True
    with pytest.raises(sl.NotThisJob, match="failed"):
        sl.check_caller(REC._replace(state="failed"), "KEY", 1001, BATCH, "/usr/bin/sudo")
    assert sl.step_from_stepd(b"slurmstepd: [812.batch]") == (812, "batch")
    assert sl.step_from_stepd(b"slurmstepd: [812.3]\0") == (812, "3")


def test_how_a_job_that_ended_without_its_node_ended() -> None:
    fields = sl.parse_squeue("NODE_FAIL|kg-b|None|vms|1001\n")
    assert fields["JobState"] == "NODE_FAIL" and fields["NodeList"] == "kg-b" and fields["UserId"] == "1001"
    for bad in ("", "RUNNING|a|b\n", "RUNNING|a|b|c|d\nPENDING|a|b|c|d\n", "running|a|b|c|d", "X JobState=Y|a|b|c|d"):
        assert sl.parse_squeue(bad) == {}
    assert sl.ending(fields, "kg-b") == "lost on node kg-b: the node failed (job NODE_FAIL)"
    assert sl.ending({"JobState": "CANCELLED", "Reason": "None"}, None) == "ended by Slurm: job CANCELLED"
    assert sl.ending({"JobState": "TIMEOUT", "Reason": "TimeLimit"}, "a").startswith("ended by Slurm on node a")
    assert sl.ending({}, "a") == "lost on node a: Slurm no longer knows its job"
    assert "RUNNING" in sl.LIVE and "PENDING" in sl.LIVE and "COMPLETED" not in sl.LIVE


def test_the_backend_table_admin_init_writes_reads_back() -> None:
    import tomllib

    for b in (sl.Backend(), BACKEND, BACKEND._replace(conf="/etc/slurm/x.conf", overhead_mib=512, cpu_model="Haswell")):
        assert sl.parse_backend(tomllib.loads(sl.backend_table(b))["backend"]) == b


@pytest.mark.parametrize(
    ("key", "caller", "seen", "why"),
    [
        ("OTHER", 1001, BATCH, "another VM's"),
        ("KEY", 1001, None, "not running inside"),
        ("KEY", 1001, BATCH._replace(job=813), "is not the job"),
        ("KEY", 1001, BATCH._replace(step="0"), "only the job's own batch step"),
        ("KEY", 1001, BATCH._replace(step="extern"), "only the job's own batch step"),
        ("KEY", 1002, BATCH, "owner"),
        ("KEY", 1001, BATCH._replace(uid=1002), "owner"),
        ("KEY", 1001, BATCH._replace(via=("/bin/dash", "/usr/bin/sudo")), "only the job's own command"),
        ("KEY", 1001, BATCH._replace(via=()), "only the job's own command"),
    ],
)
def test_the_node_side_refuses_any_other_job_step_or_caller(key: str, caller: int, seen, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sl.NotThisJob, match=why):
        sl.check_caller(REC, key, caller, seen, "/usr/bin/sudo")
    sl.check_caller(REC, "KEY", 1001, BATCH, "/usr/bin/sudo")


def test_the_node_side_takes_slurms_word_on_the_jobs_owner_and_partition() -> None:
    rec = REC
    sl.check_placement(BACKEND, {"UserId": "1001", "Partition": "vms"}, rec)
    sl.check_placement(BACKEND._replace(service_partition="svc"), {"UserId": "1001", "Partition": "svc"}, rec)
    with pytest.raises(sl.NotThisJob, match="moved out"):
        sl.check_placement(BACKEND, {"UserId": "1001", "Partition": "debug"}, rec)
    with pytest.raises(sl.NotThisJob, match="owner"):
        sl.check_placement(BACKEND, {"UserId": "0", "Partition": "vms"}, rec)
    claimed = rec._replace(state="running", claim="0123456789abcdef")
    assert sl.parse_record(claimed.to_json()) == claimed
    with pytest.raises(sl.NotThisJob):
        sl.parse_record(rec._replace(claim="x; rm").to_json())


@pytest.mark.parametrize(("back", "says", "done"), [(False, "froze", ["freeze"]), (True, None, ["freeze", "thaw"])])
def test_a_logoff_freeze_on_the_node_is_undone_when_the_owner_came_back_meanwhile(
    monkeypatch: pytest.MonkeyPatch, back: bool, says: str | None, done: list[str]
) -> None:
    """The relayed verb runs on the node, away from the login side's look at the
    sessions: a logon in between found nothing to thaw, so the logoff undoes itself."""
    from kvmgate.ops import power

    calls: list[str] = []
    logged_on = iter([False, back])  # when the logoff looked; when the node had frozen the VM

    def on_its_node(paths: object, vm: object, verb: str, wanted: object = None) -> int:
        assert callable(wanted) and wanted()
        calls.append(verb)
        return 0

    def thaw(paths: object, who: object, vm: object, wanted: object = None) -> tuple[bool, None]:
        calls.append("thaw")
        return True, None

    monkeypatch.setattr(power, "_on_its_node", on_its_node)
    monkeypatch.setattr(power, "thaw", thaw)
    assert power.sleep(None, None, None, "pause", lambda: not next(logged_on)) == says  # type: ignore[arg-type]
    assert calls == done
