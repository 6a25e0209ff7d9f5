"""The Slurm backend on two nodes (issue 14): each node's slurmd in its own
network, UTS, mount and PID namespaces, with its own /run (so its own kvmgate
runtime directory), address and hostname; the state directory is shared, as NFS
shares it in production. A VM hibernated on one node resumes on the other with
its guest's state intact; `admin move` and `admin evacuate` move VMs; a node
that dies leaves its VM recorded as lost there, and its next start boots on the
node that is left."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, DEFAULT_POLICY, RUN, SSH_THROWAWAY, STATE, Kvmgate, boot_options
from .slurm_cluster import Cluster
from .test_logon import in_session, pam, sshd, wait_state  # noqa: F401 - fixtures
from .test_slurm import guest_run, jobs_of, make_vm, uptime, wait_for
from .test_ssh_logon import Sshd

SLURM_DIR = Path("/opt/kvmgate-slurm-test-2")
NODES = ["kg-a", "kg-b"]


@pytest.fixture(scope="module")
def cluster(kg: Kvmgate) -> Iterator[Cluster]:
    c = Cluster(SLURM_DIR, NODES, ctld_port=26917, node_port=26918, spread=True, run=RUN)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def on_slurm(kg: Kvmgate, cluster: Cluster) -> Iterator[Cluster]:
    kg.write_policy(
        DEFAULT_POLICY + f'[backend]\nkind = "slurm"\npartition = "vms"\nconf = "{SLURM_DIR}/slurm.conf"\n'
        "overhead_mib = 128\n"
    )
    kg.ok("admin", "init", "--backend", "slurm", "--partition", "vms")  # and logons counted on the shared state
    yield cluster
    shutil.rmtree(Path(STATE, "sessions"), ignore_errors=True)
    cluster.run("scancel", "--full", "--partition=vms")
    for node in NODES:
        cluster.run("scontrol", "update", f"nodename={node}", "state=resume")


def node_of(kg: Kvmgate, user: str, name: str) -> str:
    st = kg.json("status", name, user=user)
    assert st["state"] == "running", st
    return str(st["node"])


def other(node: str) -> str:
    return NODES[1 - NODES.index(node)]


def drain(cluster: Cluster, node: str) -> None:
    r = cluster.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=kvmgate-test")
    assert r.returncode == 0, r.stderr


def test_hibernated_on_one_node_it_resumes_on_the_other(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    kg.ok("start", vm_name, user=alice)
    first = node_of(kg, alice, vm_name)
    guest_run(kg, alice, vm_name, "echo moved-marker > /m; hostname; echo wr''ote", "wrote")
    before = uptime(kg, alice, vm_name)
    kg.ok("hibernate", vm_name, user=alice)
    wait_for("the job to end", lambda: not jobs_of(on_slurm, alice))
    drain(on_slurm, first)
    out = kg.ok("start", vm_name, user=alice).stdout
    assert out.startswith(f"restored {vm_name} on node {other(first)}"), out
    assert node_of(kg, alice, vm_name) == other(first)
    after = uptime(kg, alice, vm_name)
    assert before <= after < before + 2.0, (before, after)
    guest_run(kg, alice, vm_name, "cat /m", "moved-marker")
    rows = jobs_of(on_slurm, alice)
    assert len(rows) == 1 and rows[0][2] == "RUNNING"


def test_admin_move_and_evacuate(
    kg: Kvmgate, on_slurm: Cluster, alice: str, bob: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    second = vm_name + "-b"
    make_vm(kg, bob, second, guest, cleanup_vms)
    kg.ok("start", vm_name, user=alice)
    start = node_of(kg, alice, vm_name)
    guest_run(kg, alice, vm_name, "echo move-marker > /m; echo wr''ote", "wrote")
    before = uptime(kg, alice, vm_name)
    out = kg.ok("admin", "move", vm_name, "--owner", alice).stdout
    assert re.match(rf"moved {vm_name} to node {other(start)} \(job \d+\)", out), out
    assert node_of(kg, alice, vm_name) == other(start)
    assert before <= uptime(kg, alice, vm_name) < before + 2.0
    guest_run(kg, alice, vm_name, "cat /m", "move-marker")
    r = kg("admin", "move", vm_name, "--owner", alice, "--to", other(start))
    assert r.returncode == 5 and "already" in r.stderr
    kg.ok("admin", "move", vm_name, "--owner", alice, "--to", start)
    assert node_of(kg, alice, vm_name) == start
    # Both VMs on one node; drain it and evacuate: both end up on the other, each under its owner.
    kg.ok("start", second, user=bob)
    if node_of(kg, bob, second) != start:
        kg.ok("admin", "move", second, "--owner", bob, "--to", start)
    drain(on_slurm, start)
    rows = kg.json("admin", "evacuate", start)
    assert sorted((r["owner"], r["to"]) for r in rows) == sorted([(alice, other(start)), (bob, other(start))])
    assert node_of(kg, alice, vm_name) == node_of(kg, bob, second) == other(start)
    guest_run(kg, alice, vm_name, "cat /m", "move-marker")
    assert [r[2] for r in jobs_of(on_slurm, bob)] == ["RUNNING"]
    assert "no VM runs on node" in kg.ok("admin", "evacuate", start).stdout


def test_a_lost_node_leaves_its_vm_recorded_there_and_the_next_start_boots_elsewhere(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    make_vm(kg, alice, vm_name, guest, cleanup_vms)
    kg.ok("start", vm_name, user=alice)
    lost = node_of(kg, alice, vm_name)
    on_slurm.kill_node(lost)
    try:
        # Slurm sees the node gone after SlurmdTimeout (10 s here); then so does kvmgate.
        wait_for("Slurm to see the node down", lambda: "down" in on_slurm.node_state(lost), 60)
        st = wait_for("stopped", lambda: (s := kg.json("status", vm_name, user=alice))["state"] == "stopped" and s, 30)
        assert st["last_run"]["how"].startswith(f"lost on node {lost}"), st
        assert f"lost on node {lost}" in kg.ok("log", vm_name, user=alice).stdout
        out = kg.ok("start", vm_name, user=alice).stdout
        assert out.startswith(f"started {vm_name} on node {other(lost)}"), out
        guest_run(kg, alice, vm_name, "echo alive", "alive")
    finally:
        on_slurm.start_node(lost)
        wait_for("the node back", lambda: on_slurm.node_state(lost).startswith("idle"), 60)


def test_a_logoff_on_the_login_node_freezes_the_vm_on_its_node_and_a_logon_thaws_it(
    kg: Kvmgate,
    on_slurm: Cluster,
    users,
    sshd: Sshd,  # noqa: F811 - the fixture imported above
    guest: Path,
    cleanup_vms: list,
    vm_name: str,
) -> None:
    user = users.make("kgl")
    sshd.authorize(user)
    kg.ok("admin", "create", vm_name, "--owner", user, "--on-logoff", "pause", "--logoff-delay", "0",
          "--", *boot_options(guest))  # fmt: skip
    cleanup_vms.append((user, vm_name))
    kg.ok("start", vm_name, "--owner", user)
    kg.ok("console", vm_name, "--owner", user, "--expect", BOOT_LINE, "--timeout", "90")
    out = in_session(sshd, user, vm_name, 'echo pam-marker > /m; echo wr""ote', "wrote")
    assert '"state": "running"' in out and '"node": "kg-' in out
    st = wait_state(kg, user, vm_name, "paused")
    assert st["state"] == "paused" and st["qemu_status"] == "paused" and st["node"] in NODES, st
    assert list(Path(STATE, "sessions", user).iterdir()) == [], "the login node pruned its own record"
    out = in_session(sshd, user, vm_name, "cat /m", "pam-marker")
    assert '"state": "running"' in out
    assert wait_state(kg, user, vm_name, "paused")["state"] == "paused"
    # A session recorded by another login node counts: no freeze while it lives.
    Path(STATE, "sessions", user, "login-b@4242-77").touch()
    kg.ok("thaw", vm_name, "--owner", user)
    in_session(sshd, user, vm_name, "echo still", "still")
    time.sleep(3)
    assert kg.json("status", vm_name, "--owner", user)["state"] == "running"


def test_ssh_and_the_display_are_reached_through_the_vms_job(
    kg: Kvmgate, on_slurm: Cluster, alice: str, bob: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    opts = boot_options(guest)
    opts[opts.index("-append") + 1] += " kvmgate.ssh"
    kg.ok("admin", "create", vm_name, "--owner", alice, "--forward", "ssh", "--", *opts)
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, user=alice)
    node = node_of(kg, alice, vm_name)
    kg.ok("console", vm_name, "--owner", alice, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "120")
    rows = kg.json("ports", vm_name, user=alice)
    assert rows[0]["service"] == "ssh" and rows[0]["node"] == node and rows[0]["held"], rows
    # kvmgate ssh: ssh(1) as alice, its ProxyCommand through the VM's job to the port on the VM's node.
    r = kg("ssh", vm_name, "--", "-v", *SSH_THROWAWAY, "true", user=alice, timeout=60)
    assert "remote software version kvmgate-test-guest" in r.stderr, r.stderr
    assert re.search(r"Executing proxy command: .*kvmgate tunnel", r.stderr), r.stderr
    # Nothing listens on the login host for it: the port is the node's own loopback.
    assert f":{rows[0]['port']} " not in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    # The display, the same way (the RFB greeting from QEMU's VNC socket on the node).
    desk = vm_name + "-d"
    kg.ok("admin", "create", desk, "--owner", alice, "--network", "user", "--", "-m", "128")
    cleanup_vms.append((alice, desk))
    kg.ok("start", desk, "--paused", "--", "-vnc", "5", user=alice)
    assert kg.json("vnc", desk, user=alice)["node"] in NODES
    r = kg("tunnel", desk, "vnc", user=alice, input="")
    assert r.returncode == 0 and r.stdout.startswith("RFB 003.008"), (r.returncode, r.stdout, r.stderr)
    for who, argv in ((bob, ["tunnel", vm_name, "ssh"]), (bob, ["ssh", vm_name])):
        r = kg(*argv, user=who, input="")
        assert r.returncode == 4 and "no such VM" in r.stderr, r.stderr
