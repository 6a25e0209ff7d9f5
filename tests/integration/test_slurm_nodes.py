"""The Slurm backend on two nodes (issue 14): each node's slurmd in its own
network, UTS, mount and PID namespaces, with its own /run (so its own kvmgate
runtime directory), address and hostname; the state directory is shared, as NFS
shares it in production. A VM hibernated on one node resumes on the other with
its guest's state intact; `admin move` and `admin evacuate` move VMs; a node
that dies leaves its VM recorded as lost there, and its next start boots on the
node that is left."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, DEFAULT_POLICY, ETC, HELPER, KVMGATE, RUN, SSH_THROWAWAY, STATE, Kvmgate, boot_options
from .slurm_cluster import Cluster
from .test_hibernate import guest_run, uptime
from .test_logon import in_session, pam, sshd, wait_state  # noqa: F401 - fixtures
from .test_networks import SNIFF
from .test_slurm import jobs_of, make_vm, wait_for
from .test_ssh_logon import Sshd

SLURM_DIR = Path("/opt/kvmgate-slurm-test-2")
NODES = ["kg-a", "kg-b"]


@pytest.fixture(scope="module")
def cluster(kg: Kvmgate) -> Iterator[Cluster]:
    with Cluster(SLURM_DIR, NODES, ctld_port=26917, node_port=26918, spread=True, run=RUN).running() as c:
        yield c


@pytest.fixture
def on_slurm(kg: Kvmgate, cluster: Cluster) -> Iterator[Cluster]:
    kg.write_policy(cluster.policy(DEFAULT_POLICY, 'cpu_model = "qemu64"'))
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


def started(kg: Kvmgate, owner: str, name: str, guest: Path, cleanup_vms: list) -> str:
    """A new VM of owner's, started: the node Slurm gave it."""
    make_vm(kg, owner, name, guest, cleanup_vms)
    kg.ok("start", name, user=owner)
    kg.ok("console", name, "--owner", owner, "--expect", BOOT_LINE, "--timeout", "180")
    return node_of(kg, owner, name)


def drain(cluster: Cluster, node: str) -> None:
    r = cluster.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=kvmgate-test")
    assert r.returncode == 0, r.stderr


def test_hibernated_on_one_node_it_resumes_on_the_other(
    kg: Kvmgate, on_slurm: Cluster, alice: str, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    first = started(kg, alice, vm_name, guest, cleanup_vms)
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
    start = started(kg, alice, vm_name, guest, cleanup_vms)
    second = vm_name + "-b"
    make_vm(kg, bob, second, guest, cleanup_vms)
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
    lost = started(kg, alice, vm_name, guest, cleanup_vms)
    on_slurm.kill_node(lost)
    try:
        # Slurm sees the node gone after SlurmdTimeout (10 s here); then so does kvmgate.
        seen: list[tuple[float, str]] = []

        def down() -> bool:
            seen.append((round(time.monotonic(), 1), on_slurm.node_state(lost)))
            return "down" in seen[-1][1]

        try:
            wait_for("Slurm to see the node down", down, 120)
        except AssertionError:
            raise AssertionError(f"{seen[:3]} ... {seen[-3:]}\n{on_slurm.diagnose()}") from None
        st = wait_for("stopped", lambda: (s := kg.json("status", vm_name, user=alice))["state"] == "stopped" and s, 30)
        assert st["last_run"]["how"].startswith(f"lost on node {lost}"), st
        assert f"lost on node {lost}" in kg.ok("log", vm_name, user=alice).stdout
        out = kg.ok("start", vm_name, user=alice).stdout
        assert out.startswith(f"started {vm_name} on node {other(lost)}"), out
        guest_run(kg, alice, vm_name, "echo alive", "alive")
    finally:
        on_slurm.start_node(lost)
        wait_for("the node back", lambda: on_slurm.node_state(lost).startswith("idle"), 90)


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
    kg.ok("console", vm_name, "--owner", user, "--expect", BOOT_LINE, "--timeout", "180")
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
    # While a tunnel is open, the node side's helper that copies its bytes is hers, not root's.
    held = subprocess.Popen(["runuser", "-u", alice, "--", KVMGATE, "tunnel", desk, "vnc"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert held.stdout is not None and held.stdout.read(12) == b"RFB 003.008\n"
        here = os.readlink("/proc/self/ns/pid")
        copiers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _helper_on_a_node(p, here, desk)]
        assert copiers and all(_uids(p) == {pwd.getpwnam(alice).pw_uid} for p in copiers), copiers
    finally:
        held.kill()
        held.wait()
    for who, argv in ((bob, ["tunnel", vm_name, "ssh"]), (bob, ["ssh", vm_name])):
        r = kg(*argv, user=who, input="")
        assert r.returncode == 4 and "no such VM" in r.stderr, r.stderr


def _helper_on_a_node(proc: Path, here: str, name: str) -> bool:
    """A helper process (not sudo) serving `tunnel NAME` in a node's own PID namespace."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        ours = HELPER.encode() in argv and b"tunnel" in argv and name.encode() in argv
        return ours and os.path.basename(argv[0]) != b"sudo" and os.readlink(proc / "ns" / "pid") != here
    except OSError:
        return False


def _uids(proc: Path) -> set[int]:
    line = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


# A VXLAN frame from userland: 8 bytes of header (I flag, the id) and an Ethernet frame with an
# ICMP echo request inside, from the service VM's MAC and address to alice's, sent as UDP to the
# other node's tunnel port (what an unprivileged user on a node can do without any capability).
FORGE = r"""
import socket, struct, sys
peer, vni, src_mac, dst_mac, src_ip, dst_ip, sport = sys.argv[1:8]
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4b47, 1) + b"kvmgate-forged"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                 socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00" + ip + icmp
vxlan = struct.pack("!II", 0x08000000, int(vni) << 8)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sport != "0":
    s.bind(("", int(sport)))  # root only: a privileged source port, as the kernel's tunnel sends from
for _ in range(5):
    try:
        s.sendto(vxlan + frame, (peer, 789))
        print("sent", flush=True)
    except OSError as e:
        print("refused", type(e).__name__, flush=True)
"""


def test_the_services_network_spans_the_nodes_and_a_user_cannot_forge_into_it(
    kg: Kvmgate, on_slurm: Cluster, alice: str, bob: str, guest: Path, cleanup_vms: list
) -> None:
    kg.write_policy(
        Path(ETC, "policy.toml")
        .read_text()
        .replace(
            'subnet = "10.78.0.0/24"\n', 'subnet = "10.78.0.0/24"\nvxlan = 42\npeers = ["10.99.0.2", "10.99.0.3"]\n'
        )
    )
    boot = boot_options(guest)
    boot[boot.index("-append") + 1] += " kvmgate.httpd"
    made = {}
    for owner, tag in (("kvmgate-svc", "svc"), (alice, "a"), (bob, "b")):
        name = f"x{tag}{secrets.token_hex(3)}"
        who = ["--service", "--no-autostart"] if owner == "kvmgate-svc" else ["--owner", owner]
        kg.ok("admin", "create", name, *who, "--network", "services", "--", *boot)
        cleanup_vms.append((owner, name))
        made[tag] = (owner, name, kg.json("admin", "show", name, "--owner", owner)["nics"][0])
    # The service VM and bob's on kg-a, alice's on kg-b.
    for node, tags in (("kg-a", ("svc", "b")), ("kg-b", ("a",))):
        drain(on_slurm, other(node))
        for tag in tags:
            owner, name, nic = made[tag]
            kg.ok("start", name, "--owner", owner)
            assert node_of(kg, owner, name) == node
        on_slurm.run("scontrol", "update", f"nodename={other(node)}", "state=resume")
    for owner, name, nic in made.values():
        kg.ok("console", name, "--owner", owner, "--expect", rf"KVMGATE-GUEST-NET eth0 {re.escape(nic['ip'])}\b",
              "--timeout", "120")  # fmt: skip
    (_, svc, snic), (_, a, anic), (_, b, bnic) = made["svc"], made["a"], made["b"]

    def guest(owner: str, name: str, script: str) -> str:
        n = secrets.randbelow(10**6)
        r = kg("console", name, "--owner", owner, "--expect", f"KGE-{n + 2}", "--timeout", "60",
               input=f"echo KGB-$(({n}+1)); {script}; echo KGE-$(({n}+2))\n")  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout[r.stdout.rfind(f"KGB-{n + 1}") :]  # this script's output only

    get = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {snic['ip']} 80"
    assert "kvmgate-guest-httpd" in guest(alice, a, get), "a user VM on kg-b reaches the service VM on kg-a"
    assert "kvmgate-guest-httpd" in guest(bob, b, get), "and on its own node"
    assert "1 packets received" in guest("kvmgate-svc", svc, f"ping -c 1 -W 5 {anic['ip']}")
    out = guest(bob, b, f"ping -c 2 -W 2 {anic['ip']}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {anic['ip']} 80")
    assert "0 packets received" in out and "kvmgate-guest-httpd" not in out, "bob's VM never reaches alice's"
    out = guest(alice, a, f"ping -c 2 -W 2 {bnic['ip']}")
    assert "0 packets received" in out

    # Bob, an ordinary user on kg-a, forges a frame from the service VM to alice's VM on kg-b.
    sniff = subprocess.Popen(on_slurm.on_node("kg-b", [sys.executable, "-c", SNIFF, anic["tap"], "8"]),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert sniff.stdout is not None and sniff.stdout.readline().strip() == "ready"
    forge = [sys.executable, "-c", FORGE, "10.99.0.3", "42", snic["mac"], anic["mac"], snic["ip"], anic["ip"], "0"]
    r = subprocess.run(on_slurm.on_node("kg-a", forge, user=bob), capture_output=True, text=True)
    assert "refused PermissionError" in r.stdout, (
        r.stdout + r.stderr
    )  # nft: only root's sockets send to the tunnel port
    # Root on kg-a, from an unprivileged source port (what bob could send were kg-a's rules not loaded
    # yet): kg-b drops it. From a privileged port, as the kernel's tunnel sends: it arrives (the test
    # sees what it looks for).
    subprocess.run(on_slurm.on_node("kg-a", forge), capture_output=True, text=True, check=True)
    subprocess.run(on_slurm.on_node("kg-a", [*forge[:-1], "700"]), capture_output=True, text=True, check=True)
    out, _ = sniff.communicate(timeout=60)
    frames = json.loads(out.strip().splitlines()[-1])
    forged = [f for f in frames if f["src"] == snic["mac"] and f["ip_src"] == snic["ip"]]
    assert len(forged) == 5, frames  # root's five from a privileged port; none of bob's, none from port >= 1024
    # From the login host (not a peer), even root's frames are dropped at kg-b.
    sniff = subprocess.Popen(on_slurm.on_node("kg-b", [sys.executable, "-c", SNIFF, anic["tap"], "5"]),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert sniff.stdout is not None and sniff.stdout.readline().strip() == "ready"
    subprocess.run([*forge[:-1], "700"], capture_output=True, text=True, check=True)
    out, _ = sniff.communicate(timeout=60)
    assert not [f for f in json.loads(out.strip().splitlines()[-1]) if f["src"] == snic["mac"]]


def test_a_service_vm_whose_node_is_lost_runs_again_on_another(
    kg: Kvmgate, on_slurm: Cluster, guest: Path, cleanup_vms: list, vm_name: str
) -> None:
    kg.write_policy(
        Path(ETC, "policy.toml")
        .read_text()
        .replace('partition = "vms"\n', 'partition = "vms"\nservice_partition = "svc"\n')
    )
    kg.ok("admin", "create", vm_name, "--service", "--no-autostart", "--", *boot_options(guest))
    cleanup_vms.append(("kvmgate-svc", vm_name))
    kg.ok("start", vm_name, "--owner", "kvmgate-svc")
    rows = on_slurm.run("squeue", "--noheader", "--user", "kvmgate-svc", "--format=%i %P %T").stdout.split()
    assert rows[1:] == ["svc", "RUNNING"], rows
    lost = node_of(kg, "kvmgate-svc", vm_name)
    on_slurm.kill_node(lost)
    try:

        def moved() -> bool:
            st = kg("status", vm_name, "--owner", "kvmgate-svc", "--json")
            got = json.loads(st.stdout) if st.returncode == 0 else {}
            return got.get("node") == other(lost) and got.get("state") == "running"

        wait_for("the service VM on the other node", moved, 120)
        assert [
            r.split()[0] for r in on_slurm.run("squeue", "-h", "-o", "%i", "-u", "kvmgate-svc").stdout.splitlines()
        ] == [rows[0]], "the same job, requeued"
        # The requeued job boots the guest afresh: type only once its shell is up.
        kg.ok("console", vm_name, "--owner", "kvmgate-svc", "--expect", BOOT_LINE, "--timeout", "180")
        r = kg("console", vm_name, "--owner", "kvmgate-svc", "--expect", "al-ive", "--timeout", "90",
               input="echo al-''ive\n")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"Slurm requeued job {rows[0]}" in kg.json("status", vm_name, "--owner", "kvmgate-svc")["note"]
    finally:
        on_slurm.start_node(lost)
        wait_for("the node back", lambda: on_slurm.node_state(lost).startswith("idle"), 90)
