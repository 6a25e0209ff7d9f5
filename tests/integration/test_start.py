"""Starting and stopping real VMs: the guest boots under TCG, QEMU runs with the
owner's uid and nothing else, exit codes are the documented ones."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import threading
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, KVMGATE, Kvmgate, boot_options


@pytest.fixture
def booted(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> str:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "16M", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, "--owner", alice)
    return vm_name


def qemu_pid(kg: Kvmgate, owner: str, name: str) -> int:
    pid = kg.json("status", name, "--owner", owner)["pid"]
    assert isinstance(pid, int)
    return pid


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def test_guest_boots_and_prints_its_boot_line(kg: Kvmgate, alice: str, booted: str) -> None:
    r = kg("console", booted, "--owner", alice, "--expect", BOOT_LINE, "--timeout", "90")
    assert r.returncode == 0, r.stderr
    assert "KVMGATE-GUEST-READY kernel=" in r.stdout and "disk=" in r.stdout
    st = kg.json("status", booted, "--owner", alice)
    assert st["state"] == "running" and st["qemu_status"] == "running"


def test_qemu_credentials(kg: Kvmgate, alice: str, booted: str) -> None:
    pid = qemu_pid(kg, alice, booted)
    s = proc_status(pid)
    uid = pwd.getpwnam(alice).pw_uid
    qgid = int(subprocess.run(["getent", "group", "kvmgate-qemu"], capture_output=True, text=True).stdout.split(":")[2])
    assert s["Uid"].split() == [str(uid)] * 4
    assert s["Gid"].split() == [str(qgid)] * 4
    assert s["Groups"].strip() == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(s[cap], 16) == 0, cap
    assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert sorted(e.split(b"=")[0].decode() for e in env if e) == ["HOME", "LC_ALL", "PATH", "TMPDIR"]
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert "Max core file size        0" in limits
    assert re.search(r"Max open files\s+4096\s+4096", limits), "the policy's max_open_files"
    assert re.search(r"Max file size\s+unlimited", limits), "no overlay: no file size limit"


def test_memory_cgroup_limit(kg: Kvmgate, alice: str, booted: str) -> None:
    pid = qemu_pid(kg, alice, booted)
    line = next(
        ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ":memory:" in ln or ln.startswith("0::")
    )
    rel = line.split(":", 2)[2]
    for base, name in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        f = Path(base + rel, name)
        if f.exists():
            assert int(f.read_text()) == (256 + 128 + 256) << 20  # -m 256, TCG's cache, the default overhead
            return
    pytest.fail("no memory cgroup found for QEMU")


def test_start_twice_is_wrong_state(kg: Kvmgate, alice: str, booted: str) -> None:
    r = kg("start", booted, "--owner", alice)
    assert r.returncode == 5 and "already running" in r.stderr


def test_stop_powers_down_gracefully(kg: Kvmgate, alice: str, booted: str) -> None:
    kg.ok("console", booted, "--owner", alice, "--expect", BOOT_LINE, "--timeout", "90")
    out = kg.ok("stop", booted, "--owner", alice, "--timeout", "30").stdout
    assert "powered down" in out
    assert kg.json("status", booted, "--owner", alice)["state"] == "stopped"
    r = kg("stop", booted, "--owner", alice)
    assert r.returncode == 5 and "not running" in r.stderr


def test_concurrent_starts_exactly_one_wins(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    results: list[int] = []

    def go() -> None:
        results.append(kg("start", vm_name, "--owner", alice, "--paused").returncode)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 5, 5, 5]


def test_no_such_vm(kg: Kvmgate, alice: str) -> None:
    for verb in ("start", "stop", "status", "console"):
        r = kg(verb, "nosuchvm", "--owner", alice)
        assert (r.returncode, r.stderr) == (4, "kvmgate: no such VM: nosuchvm\n")


def test_list_json(kg: Kvmgate, alice: str, booted: str) -> None:
    rows = kg.json("list", "--owner", alice)
    assert {"name": booted, "owner": alice, "state": "running"} in rows


def test_console_is_exclusive(kg: Kvmgate, alice: str, booted: str) -> None:
    first = subprocess.Popen(
        ["/opt/kvmgate-test/bin/kvmgate", "console", booted, "--owner", alice, "--timeout", "5"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        import time

        time.sleep(1)
        r = kg("console", booted, "--owner", alice, "--timeout", "1")
        assert r.returncode == 5 and "already attached" in r.stderr
    finally:
        first.kill()
        first.wait()


def test_audit_records_the_argv(kg: Kvmgate, alice: str, booted: str) -> None:
    lines = [json.loads(ln) for ln in Path("/opt/kvmgate-test/log/audit.log").read_text().splitlines()]
    starts = [ln for ln in lines if ln.get("verb") == "start" and ln.get("vm") == booted and ln["outcome"] == "ok"]
    assert starts and starts[-1]["argv"][0] == "/usr/bin/qemu-system-x86_64" and "-sandbox" in starts[-1]["argv"]


def test_admin_memory_user_kernel_boots(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    """The foundation issue's example: the admin fixes only memory and graphics; the
    user brings the kernel, initrd and command line (all in their list)."""
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", "-m", "256", "-nographic")
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, "--owner", alice, "--", *boot_options(guest)[3:])  # -kernel, -initrd, -append
    r = kg("console", vm_name, "--owner", alice, "--expect", BOOT_LINE, "--timeout", "90")
    assert r.returncode == 0 and "KVMGATE-GUEST-READY" in r.stdout


def test_console_log_of_an_old_release_is_kept_bounded(kg: Kvmgate, alice: str, booted: str) -> None:
    """A VM started by a release before the console pump writes its log without a
    bound: `admin reap` still empties one well past the ring's bound, and the
    console keeps working. (Simulated by appending to the log.)"""
    kg.ok("console", booted, "--owner", alice, "--expect", BOOT_LINE, "--timeout", "90")
    log = Path(kg.json("status", booted, "--owner", alice)["directory"], "log", "console.log")
    with open(log, "ab") as f:
        f.write(b"flood " * (2 << 20))
    assert log.stat().st_size > 9 << 20
    assert "emptied the console log" in kg.ok("admin", "reap").stdout
    assert log.stat().st_size < 1 << 20
    r = kg(
        "console", booted, "--owner", alice, "--expect", "after-42", "--timeout", "30", input="echo after-$((6*7))\n"
    )
    assert r.returncode == 0, r.stderr


def test_list_says_when_there_are_no_vms_and_has_a_header_on_a_terminal(
    kg: Kvmgate, users, vm_name: str, cleanup_vms: list
) -> None:
    """`list` printed nothing at all when empty, and no header."""
    carol = users.make("kgl")
    assert kg.ok("list", user=carol).stdout == f"{carol} has no VMs\n"
    assert kg.json("list", user=carol) == []
    kg.ok("admin", "create", vm_name, "--owner", carol, "--", "-m", "64")
    cleanup_vms.append((carol, vm_name))
    assert kg.ok("list", user=carol).stdout.split() == [carol, vm_name, "stopped"], "no header in a pipe"
    out = subprocess.run(
        ["script", "-qec", f"runuser -u {carol} -- {KVMGATE} list", "/dev/null"], capture_output=True, text=True
    ).stdout
    assert out.splitlines()[0].split() == ["OWNER", "NAME", "STATE"], out


def test_console_detaches_at_the_end_of_piped_input(kg: Kvmgate, alice: str, booted: str) -> None:
    """`echo cmd | kvmgate console vm` never returned: it now detaches once the
    input has ended and the guest has been quiet for a second, showing the answer."""
    kg.ok("console", booted, "--owner", alice, "--expect", BOOT_LINE, "--timeout", "90")
    r = kg("console", booted, "--owner", alice, input="echo piped-$((6*7))\n", timeout=60)
    assert r.returncode == 0 and "piped-42" in r.stdout, r.stdout[-500:]


def test_an_error_after_the_console_drops_to_the_user_is_one_line(kg: Kvmgate, alice: str, booted: str) -> None:
    """After the drop to the caller, the refusal's audit once ran as the user: a
    traceback, exit 1, and the real line never shown."""
    r = kg("console", booted, "--expect", "NEVER-MATCHES-[0-9]{40}", "--timeout", "2", user=alice)
    assert r.returncode == 5, r.stderr
    assert r.stderr.endswith("kvmgate: console: timed out waiting for the expected output\n"), r.stderr
    assert "Traceback" not in r.stderr


def test_admin_resize_grows_a_stopped_vms_disk_only(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "16M", "--", "-m", "64")
    cleanup_vms.append((alice, vm_name))
    disk = Path(kg.json("status", vm_name, "--owner", alice)["directory"], "disks", "disk0.qcow2")
    out = kg.ok("admin", "resize", vm_name, "disk0.qcow2", "32M", "--owner", alice).stdout
    assert out.endswith("disk0.qcow2 is now 32 MiB\n")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["virtual-size"] == 32 << 20 and os.stat(disk).st_uid == pwd.getpwnam(alice).pw_uid
    r = kg("admin", "resize", vm_name, "disk0.qcow2", "16M", "--owner", alice)
    assert r.returncode == 3 and "a disk only grows" in r.stderr
    r = kg("admin", "resize", vm_name, "../settings.json", "64M", "--owner", alice)
    assert r.returncode == 2
    kg.ok("start", vm_name, "--owner", alice, "--paused")
    r = kg("admin", "resize", vm_name, "disk0.qcow2", "64M", "--owner", alice)
    assert r.returncode == 5 and "stop it" in r.stderr


def test_admin_set_options_gives_a_new_identity_and_keeps_the_rest(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list
) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "16M", "--on-logoff", "pause", "--", "-m", "64")
    cleanup_vms.append((alice, vm_name))
    before = kg.json("status", vm_name, "--owner", alice)
    Path(before["directory"], "log", "console.prev.log").write_text("history\n")
    out = kg.ok("admin", "set", vm_name, "--owner", alice, "--", "-m", "96", "-nographic").stdout
    assert "new options" in out
    after = kg.json("status", vm_name, "--owner", alice)
    assert after["directory"] != before["directory"] and not Path(before["directory"]).exists()
    assert after["memory_mib"] == 96 and after["on_logoff"] == "pause", "settings kept"
    assert Path(after["directory"], "disks", "disk0.qcow2").exists(), "disks kept"
    assert kg.ok("log", vm_name, "--owner", alice, "--previous").stdout == "history\n", "history kept"
    shown = kg.json("admin", "show", vm_name, "--owner", alice)
    assert "96" in json.dumps(shown)
    kg.ok("start", vm_name, "--owner", alice, "--paused")
    r = kg("admin", "set", vm_name, "--owner", alice, "--", "-m", "128")
    assert r.returncode == 5 and "stop it" in r.stderr


def test_a_group_left_with_a_smaller_limit_does_not_stop_a_start(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    """An upgrade changed the limit (TCG's cache now counts): cgroup v1 refused to
    raise memory.limit_in_bytes above the old memsw limit left in the VM's group,
    and the start failed with an internal error."""
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, "--owner", alice, "--paused")
    pid = kg.json("status", vm_name, "--owner", alice)["pid"]
    line = next(ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ":memory:" in ln)
    cg = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2])
    kg.ok("stop", vm_name, "--owner", alice, "--force")
    cg.mkdir(exist_ok=True)  # a stop removes it; a killed helper or an older release left it
    assert (cg / "memory.memsw.limit_in_bytes").exists(), f"swap accounting in {cg}"
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (cg / name).write_text(str(300 << 20))  # what an older release left
    kg.ok("start", vm_name, "--owner", alice, "--paused")
    assert int((cg / "memory.limit_in_bytes").read_text()) == (256 + 128 + 256) << 20
