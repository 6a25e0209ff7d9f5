"""An installation upgrades in place, with VMs running and hibernated, and every VM
is still controllable afterwards (decisions: "Upgrades"). The previous release is
installed from this repository's own history, VMs are started and hibernated with
it, then this tree is installed over it and operates them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, DEFAULT_POLICY, INSTALL_ARGS, PAUSE_ARGS, PREFIX, REPO, Kvmgate, boot_options, run

# The last commit before the layered layout (issue 9): the release this tree upgrades.
PREVIOUS = "bf3876372abdedc379607307e209726c17801abb"


def install(tree: Path) -> None:
    extra = PAUSE_ARGS if tree == REPO else []  # the previous release has no pause points
    run([str(tree / "install.sh"), *INSTALL_ARGS, *extra], check=True)


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    have = run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"])
    if have.returncode:
        pytest.fail(f"the previous release {PREVIOUS} is not in this clone's history (a shallow clone?)")
    out = tmp_path / "previous"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def test_upgrade_with_running_and_hibernated_vms(
    kg: Kvmgate, alice: str, previous: Path, cleanup_vms: list, guest: Path
) -> None:
    names = {k: f"up{k}{os.getpid() % 10000}" for k in ("run", "hib", "set")}
    # The previous release refuses policy keys it does not know.
    kg.write_policy("\n".join(ln for ln in DEFAULT_POLICY.splitlines() if not ln.startswith("audit_")) + "\n")
    try:
        install(previous)
        assert Path(PREFIX, "lib/kvmgate/kvmgate/helper/main.py").exists()  # really the old layout
        for key, name in names.items():
            extra = ["--on-logoff", "pause", "--forward", "ssh"] if key == "set" else []
            kg.ok("admin", "create", name, "--owner", alice, *extra, "--", *boot_options(guest))
            cleanup_vms.append((alice, name))
            kg.ok("start", name, user=alice)
            kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
        kg.ok("hibernate", names["hib"], user=alice)
        old_ports = json.loads(kg.ok("ports", names["set"], "--json", user=alice).stdout)
    finally:
        install(REPO)  # this tree, over the old one (and the suite's own installation again)
        kg.write_policy(DEFAULT_POLICY)

    assert not Path(PREFIX, "lib/kvmgate/kvmgate/helper").exists()  # stale modules are gone
    assert kg.json("status", names["run"], user=alice)["state"] == "running"  # type: ignore[index]
    assert kg.json("status", names["hib"], user=alice)["state"] == "hibernated"  # type: ignore[index]
    out = kg.ok("start", names["hib"], user=alice).stdout
    assert out.startswith(f"restored {names['hib']}")
    kg.ok("console", names["hib"], "--expect", r"#", "--timeout", "60", user=alice, input="\n")
    ports = json.loads(kg.ok("ports", names["set"], "--json", user=alice).stdout)
    assert [{k: v for k, v in row.items() if k != "held"} for row in ports] == old_ports  # "held" is new
    show = kg.json("admin", "show", names["set"], "--owner", alice)
    assert show["on_logoff"] == "pause" and show["forwards"][0]["service"] == "ssh"  # type: ignore[index]
    kg.ok("freeze", names["set"], user=alice)
    kg.ok("hibernate", names["set"], user=alice)
    assert kg.ok("thaw", names["set"], user=alice).stdout.startswith("restored")
    for name in names.values():
        assert kg("stop", name, "--force", user=alice).returncode == 0
