"""Wake on connect: kvmgate-gated, running unprivileged, wakes a hibernated VM
when a TCP connection reaches the VM's assigned port, and the connection reaches
a server inside the guest; the user never logs on to the host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import HELPER, PREFIX, Kvmgate, as_user, httpd_options, popen_as


def wake_port(kg: Kvmgate, user: str, name: str, *extra: str) -> int:
    """Forward guest port 80 through kvmgate-gated; returns the host port from the pool."""
    kg.ok("admin", "set", name, "--owner", user, "--forward", "http", "--wake", "on", *extra)
    rows = kg.json("ports", name, "--owner", user)
    assert [(r["service"], r["via"]) for r in rows] == [("http", "kvmgate-gated")]
    return int(rows[0]["port"])


@pytest.fixture
def gated(kg: Kvmgate) -> Iterator[subprocess.Popen[str]]:
    def launch() -> subprocess.Popen[str]:
        p = popen_as(
            "kvmgate-gated", [f"{PREFIX}/lib/kvmgate/kvmgate-gated"], {"PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE
        )
        assert "listening on" in (p.stdout.readline() if p.stdout else "")
        return p

    procs: list[subprocess.Popen[str]] = []
    gated.launch = lambda: procs.append(launch()) or procs[-1]  # type: ignore[attr-defined]
    yield gated  # type: ignore[misc]
    for p in procs:
        p.terminate()
        p.wait(10)


def get(port: int, timeout: float = 60) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        return r.read().decode()


def test_connection_wakes_a_hibernated_vm(
    kg: Kvmgate, users, gated, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    user = users.make("kgw")
    kg.ok(
        "admin",
        "create",
        vm_name,
        "--owner",
        user,
        "--on-logoff",
        "hibernate",
        "--",
        *httpd_options(guest),
    )
    cleanup_vms.append((user, vm_name))
    port = wake_port(kg, user, vm_name, "--idle", "3")
    kg.ok("start", vm_name, "--owner", user)
    kg.ok("console", vm_name, "--owner", user, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "90")
    kg.ok("hibernate", vm_name, "--owner", user)
    assert kg.json("status", vm_name, "--owner", user)["state"] == "hibernated"

    p = gated.launch()
    assert get(port).strip() == "kvmgate-guest-httpd"  # the connection woke the VM and reached the guest
    assert kg.json("status", vm_name, "--owner", user)["state"] == "running"

    # idle, with no connection and no host session: hibernated again, per its policy
    deadline = time.monotonic() + 30
    while kg.json("status", vm_name, "--owner", user)["state"] != "hibernated":
        assert time.monotonic() < deadline, "the idle VM was not hibernated"
        time.sleep(0.3)

    # gated restarts without losing its listeners
    p.terminate()
    p.wait(10)
    gated.launch()
    assert get(port).strip() == "kvmgate-guest-httpd"
    listeners = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert [line.split()[3] for line in listeners.splitlines()] == [f"127.0.0.1:{port}"]


def test_open_connection_counts_as_a_session(
    kg: Kvmgate, users, gated, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    user = users.make("kgx")
    kg.ok("admin", "create", vm_name, "--owner", user, "--on-logoff", "pause", "--", *httpd_options(guest))
    cleanup_vms.append((user, vm_name))
    port = wake_port(kg, user, vm_name, "--idle", "1")
    kg.ok("start", vm_name, "--owner", user)
    kg.ok("console", vm_name, "--owner", user, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "90")
    gated.launch()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # httpd answers and keeps reading nothing more
        time.sleep(0.5)
        records = os.listdir(f"/run/kvmgate-test/sessions/{user}")
        assert any("-gated-" in r for r in records), records
        kg.ok("admin", "reap")  # a held session keeps the VM awake even through a reap
        assert kg.json("status", vm_name, "--owner", user)["state"] == "running"


def test_only_gated_may_use_gated_verbs(kg: Kvmgate, alice: str) -> None:
    for verb in (["gated-config"], ["gated-wake", f"{alice}:x"], ["gated-idle", f"{alice}:x"]):
        r = as_user(alice, ["sudo", "-n", HELPER, *verb])
        assert r.returncode == 3 and "only kvmgate-gated" in r.stderr
    r = as_user("kvmgate-gated", ["sudo", "-n", HELPER, "gated-config"])
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), list)


def test_gated_acts_only_on_vms_with_wake_ports(
    kg: Kvmgate, alice: str, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *httpd_options(guest))
    cleanup_vms.append((alice, vm_name))
    for verb in ("gated-wake", "gated-idle"):
        r = as_user("kvmgate-gated", ["sudo", "-n", HELPER, verb, f"{alice}:{vm_name}"])
        assert r.returncode == 4, r.stderr
    assert kg.json("status", vm_name, "--owner", alice)["state"] == "stopped"


def test_wakes_frozen_and_crashed_vms(kg: Kvmgate, users, gated, guest: Path, vm_name: str, cleanup_vms: list) -> None:
    user = users.make("kgy")
    kg.ok("admin", "create", vm_name, "--owner", user, "--", *httpd_options(guest))
    cleanup_vms.append((user, vm_name))
    port = wake_port(kg, user, vm_name)
    kg.ok("start", vm_name, "--owner", user)
    kg.ok("console", vm_name, "--owner", user, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "90")
    gated.launch()
    kg.ok("freeze", vm_name, "--owner", user)  # QEMU still accepts TCP; only a thaw makes the guest answer
    assert get(port, timeout=20).strip() == "kvmgate-guest-httpd"
    os.kill(kg.json("status", vm_name, "--owner", user)["pid"], 9)  # a crash: gated keeps listening
    time.sleep(1)
    assert get(port).strip() == "kvmgate-guest-httpd"  # the next connection starts the VM again


FLOOD = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(120)
"""


def test_one_owners_flood_never_shuts_out_another(kg: Kvmgate, users, gated, guest: Path, cleanup_vms: list) -> None:
    """1,100 connections held to one's own wake port once exhausted gated's
    descriptors: another owner's connection hung and gated wrote 3 MB/s of
    tracebacks. Now one owner gets at most 64 per VM, 128 in all; the rest are
    closed at once, and the log says so in a bounded number of lines."""
    flooder, victim = users.make("kgf"), users.make("kgv")
    ports = {}
    for user in (flooder, victim):
        name = f"w{user[-6:]}"
        kg.ok("admin", "create", name, "--owner", user, "--", *httpd_options(guest))
        cleanup_vms.append((user, name))
        ports[user] = wake_port(kg, user, name)
        kg.ok("start", name, "--owner", user)
        kg.ok("console", name, "--owner", user, "--expect", r"KVMGATE-GUEST-NET eth0", "--timeout", "90")
    p = gated.launch()
    flood = popen_as(flooder, ["/usr/bin/python3", "-c", FLOOD, str(ports[flooder]), "1100"])
    try:
        assert flood.stdout is not None and int(flood.stdout.readline()) > 0
        time.sleep(1)
        held = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{ports[flooder]} )"], capture_output=True, text=True
        ).stdout
        assert len(held.splitlines()) <= 64, "at most 64 held for one VM"
        assert get(ports[victim], timeout=30).strip() == "kvmgate-guest-httpd", "another owner gets through"
        assert p.poll() is None
    finally:
        flood.kill()
        flood.wait()
    p.terminate()
    _, err = p.communicate(timeout=30)  # its last helper calls, under the suite's load
    assert "Traceback" not in err and len(err.splitlines()) <= 20, err[-2000:]
    assert "too many open" in err
