"""User-mode networking end to end: the note's `-net nic -net user -redir`
reaches a server inside the guest, through a port bound to loopback only."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from ..conftest import Kvmgate, httpd_options


def test_redir_reaches_the_guest_on_loopback_only(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    port = 21995  # -redir ports come from the admin's pool too (the test policy's is 21000-21999)
    kg.ok(
        "admin",
        "create",
        vm_name,
        "--owner",
        alice,
        "--",
        *httpd_options(guest, "-redir", f"tcp:{port}::80"),
    )
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", r"KVMGATE-GUEST-NET eth0 10\.0\.2\.15", "--timeout", "90", user=alice)
    deadline, body = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                body = r.read().decode()
                break
        except OSError:
            time.sleep(0.3)
    assert body.strip() == "kvmgate-guest-httpd"
    listeners = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{port}" in listeners and f"0.0.0.0:{port}" not in listeners and "*:" not in listeners
