"""Service VMs: the note's third logon path. Owned by a system account, started
at boot, supervised (a crash is a failure systemd restarts), visible to users,
controllable by none of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from ..conftest import BOOT_LINE, KVMGATE, Kvmgate, boot_options

SVC = "kvmgate-svc"


def test_service_vm_life(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    kg.ok("admin", "create", vm_name, "--service", "--", *boot_options(guest))
    cleanup_vms.append((SVC, vm_name))
    info = kg.json("admin", "show", vm_name, "--owner", SVC)
    assert (info["owner"], info["service"], info["autostart"]) == (SVC, True, True)

    kg.ok("admin", "autostart")
    assert kg.json("status", vm_name, "--owner", SVC)["state"] == "running"
    kg.ok("admin", "autostart")  # idempotent: a running service VM is left alone

    rows = json.loads(kg.ok("list", "--services", "--json", user=alice).stdout)
    assert {"name": vm_name, "owner": SVC, "state": "running", "addresses": []} in rows
    for verb in ("stop", "freeze", "hibernate", "console"):
        r = kg(verb, vm_name, user=alice)
        assert r.returncode == 4, (verb, r.stderr)
    assert kg("stop", vm_name, "--owner", SVC, user=alice).returncode == 3
    assert vm_name not in kg.ok("list", user=alice).stdout


def _watch(name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [KVMGATE, "admin", "watch", f"{SVC}:{name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _running(kg: Kvmgate, name: str, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = kg.json("status", name, "--owner", SVC)
        if st["state"] == "running" and st.get("pid"):
            return int(st["pid"])
        time.sleep(0.1)
    raise AssertionError("the service VM did not start")


def test_watch_reports_crashes_not_stops(kg: Kvmgate, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    kg.ok("admin", "create", vm_name, "--service", "--no-autostart", "--", *boot_options(guest))
    cleanup_vms.append((SVC, vm_name))
    # a crash: the watcher fails, so systemd's Restart=on-failure starts it again
    w = _watch(vm_name)
    os.kill(_running(kg, vm_name), signal.SIGKILL)
    assert w.wait(30) == 7 and "exited unexpectedly" in w.stderr.read()  # type: ignore[union-attr]
    # a stop through kvmgate: the watcher succeeds, nothing restarts it
    w = _watch(vm_name)
    _running(kg, vm_name)
    kg.ok("console", vm_name, "--owner", SVC, "--expect", BOOT_LINE, "--timeout", "90")
    kg.ok("stop", vm_name, "--owner", SVC, "--force")
    assert w.wait(30) == 0
    # systemctl stop: SIGTERM to the watcher stops the VM and succeeds
    w = _watch(vm_name)
    _running(kg, vm_name)
    w.send_signal(signal.SIGTERM)
    assert w.wait(60) == 0
    assert kg.json("status", vm_name, "--owner", SVC)["state"] == "stopped"
