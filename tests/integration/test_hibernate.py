"""Freeze, thaw, hibernate and restore real guests, and the failure cases:
a full file system, a corrupted state, QEMU or the wrapper killed with -9."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

from ..conftest import BOOT_LINE, KVMGATE, Kvmgate, boot_options


def guest_run(kg: Kvmgate, user: str, name: str, command: str, expect: str) -> str:
    """Run `command` in the guest's shell and return what it printed, which must
    match `expect`. That output is cut out between two marks only the guest's
    shell can print (its arithmetic makes them; the typed line never holds them):
    `console --expect` also searches the scrollback, where an earlier command's
    output (a marker, an uptime from before a hibernate) would match at once.
    The leading blanks are for the guest's line editor, which can lose the first
    keys typed while it waits for its terminal query's answer."""
    n = secrets.randbelow(10**9)
    begin, end = f"gr-{n + 1}", f"gr-{n + 2}"
    line = f"        echo gr-$(({n}+1)); {command}; echo gr-$(({n}+2))\n"
    r = kg("console", name, "--expect", rf"{begin}\s[\s\S]*{end}\s", "--timeout", "30", user=user, input=line)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    out = r.stdout.split(begin, 1)[1].split(end, 1)[0]
    assert re.search(expect, out), (expect, out)
    return out


def uptime(kg: Kvmgate, user: str, name: str) -> float:
    out = guest_run(kg, user, name, "echo up=$(cut -d' ' -f1 /proc/uptime)", r"up=[0-9]+\.[0-9]+\s")
    return float(re.findall(r"up=([0-9]+\.[0-9]+)", out)[-1])


def gone(pid: int, wait: float = 5) -> bool:
    """The process has exited (a zombie holds no memory) within `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def state(kg: Kvmgate, user: str, name: str) -> dict:
    return kg.json("status", name, user=user)  # type: ignore[return-value]


def test_freeze_and_thaw(kg: Kvmgate, alice: str, vm: str) -> None:
    guest_run(kg, alice, vm, "echo frozen-marker > /m; echo wr''ote", "wrote")
    kg.ok("freeze", vm, user=alice)
    st = state(kg, alice, vm)
    assert st["state"] == "paused" and st["qemu_status"] == "paused"
    assert "already frozen" in kg.ok("freeze", vm, user=alice).stdout
    kg.ok("thaw", vm, user=alice)
    assert state(kg, alice, vm)["state"] == "running"
    guest_run(kg, alice, vm, "cat /m", "frozen-marker")


def test_hibernate_and_restore(kg: Kvmgate, alice: str, vm: str) -> None:
    guest_run(kg, alice, vm, "echo hib-marker > /m; echo wr''ote", "wrote")
    before = uptime(kg, alice, vm)
    pid = state(kg, alice, vm)["pid"]
    out = kg.ok("hibernate", vm, user=alice).stdout
    assert "hibernated" in out
    assert gone(pid), "QEMU is gone and its memory freed"
    st = state(kg, alice, vm)
    assert st["state"] == "hibernated" and st["saved_bytes"] > 1 << 20 and "saved_at" in st
    time.sleep(2)  # the guest must not see this time pass
    r = kg("start", vm, "--", "-snapshot", user=alice)
    assert r.returncode == 5 and "resumes with the options" in r.stderr
    assert "restored" in kg.ok("start", vm, user=alice).stdout
    after = uptime(kg, alice, vm)
    assert before <= after < before + 1.5, (before, after)
    guest_run(kg, alice, vm, "cat /m", "hib-marker")
    d = Path(st["directory"], "saved")
    assert {p.name for p in d.iterdir()} <= {"state.discarded"}, "the state is gone once the VM runs again"
    deadline = time.monotonic() + 10  # its blocks are freed by a detached child, after the command returned
    while list(d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(d.iterdir()) == []


def test_a_state_left_being_freed_goes_with_the_reaper_or_the_next_hibernate(kg: Kvmgate, alice: str, vm: str) -> None:
    """A restore's state whose freeing child was killed is removed by the reaper, or by
    the next hibernate."""
    d = Path(state(kg, alice, vm)["directory"], "saved")
    (d / "state.discarded").write_bytes(b"x" * 4096)
    assert "removed a restored state left in" in kg.ok("admin", "reap").stdout
    assert list(d.iterdir()) == []
    (d / "state.discarded").write_bytes(b"x" * 4096)
    kg.ok("hibernate", vm, user=alice)
    assert sorted(p.name for p in d.iterdir()) == ["state", "state.json"]
    kg.ok("start", vm, user=alice)
    assert state(kg, alice, vm)["state"] == "running"


def test_thaw_restores_a_hibernated_vm(kg: Kvmgate, alice: str, vm: str) -> None:
    kg.ok("hibernate", vm, user=alice)
    assert "restored" in kg.ok("thaw", vm, user=alice).stdout
    assert state(kg, alice, vm)["state"] == "running"


def test_snapshot_vm_cannot_hibernate(kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, "--", "-snapshot", user=alice)
    r = kg("hibernate", vm_name, user=alice)
    assert r.returncode == 5 and "-snapshot" in r.stderr
    assert state(kg, alice, vm_name)["state"] == "running"


def test_disk_full_during_hibernate_loses_nothing(kg: Kvmgate, alice: str, vm: str) -> None:
    guest_run(kg, alice, vm, "echo full-marker > /m; echo wr''ote", "wrote")
    saved = Path(state(kg, alice, vm)["directory"], "saved")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(saved)], check=True)
    try:
        r = kg("hibernate", vm, user=alice)
        assert r.returncode == 1 and "No space left on device" in r.stderr and "running again" in r.stderr
        assert list(saved.iterdir()) == []
    finally:
        subprocess.run(["umount", str(saved)], check=True)
    assert state(kg, alice, vm)["state"] == "running"
    guest_run(kg, alice, vm, "cat /m", "full-marker")


def test_corrupt_state_is_kept_and_refused(kg: Kvmgate, alice: str, vm: str) -> None:
    guest_run(kg, alice, vm, "echo corrupt-marker > /m; echo wr''ote", "wrote")
    kg.ok("hibernate", vm, user=alice)
    f = Path(state(kg, alice, vm)["directory"], "saved", "state")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = kg("start", vm, user=alice)
    assert r.returncode == 1 and "corrupt" in r.stderr and "kept" in r.stderr
    assert state(kg, alice, vm)["state"] == "hibernated" and f.exists()
    data[len(data) // 2] ^= 0xFF  # the admin restores a good copy: the VM comes back
    f.write_bytes(bytes(data))
    kg.ok("start", vm, user=alice)
    guest_run(kg, alice, vm, "cat /m", "corrupt-marker")


def test_a_record_from_before_version_2_is_checked_with_its_sha256(kg: Kvmgate, alice: str, vm: str) -> None:
    """Upgrades: a state saved by a release that recorded a SHA-256 restores, and a
    bent byte is still found; a record naming an unknown checksum is refused."""
    guest_run(kg, alice, vm, "echo v1-marker > /m; echo wr''ote", "wrote")
    kg.ok("hibernate", vm, user=alice)
    saved = Path(state(kg, alice, vm)["directory"], "saved")
    record = json.loads((saved / "state.json").read_text())
    assert record["version"] == 3 and record["checksum"].startswith("crc32:")
    for checksum in ("md5:00", f"sha256:{'0' * 64}"):
        bad = {k: v for k, v in record.items() if k not in ("version", "checksum")}
        bad["sha256" if checksum.startswith("sha256") else "checksum"] = (
            checksum.partition(":")[2] if checksum.startswith("sha256") else checksum
        )
        (saved / "state.json").write_text(json.dumps(bad))
        r = kg("start", vm, user=alice)
        assert r.returncode == 1 and "kept" in r.stderr, r.stderr
        assert state(kg, alice, vm)["state"] == "hibernated"
    v1 = {k: v for k, v in record.items() if k not in ("version", "checksum")}
    v1["sha256"] = hashlib.sha256((saved / "state").read_bytes()).hexdigest()
    (saved / "state.json").write_text(json.dumps(v1))
    assert "restored" in kg.ok("start", vm, user=alice).stdout
    guest_run(kg, alice, vm, "cat /m", "v1-marker")


def test_qemu_killed_while_frozen(kg: Kvmgate, alice: str, vm: str) -> None:
    kg.ok("freeze", vm, user=alice)
    os.kill(state(kg, alice, vm)["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state(kg, alice, vm)["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state(kg, alice, vm)["state"] == "stopped"
    kg.ok("start", vm, user=alice)  # the VM can simply be started again
    kg.ok("console", vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)


def test_wrapper_killed_mid_hibernate(kg: Kvmgate, alice: str, vm: str) -> None:
    guest_run(kg, alice, vm, "echo kill-marker > /m; echo wr''ote", "wrote")
    saved = Path(state(kg, alice, vm)["directory"], "saved")
    p = subprocess.Popen(
        [KVMGATE, "hibernate", vm, "--owner", alice], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tmp = saved / "state.tmp"
        if tmp.exists() and tmp.stat().st_size > 0:
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = state(kg, alice, vm)
    assert st["state"] in ("paused", "running"), st  # QEMU lives on; nothing was lost
    assert not (saved / "state.json").exists()
    kg.ok("thaw", vm, user=alice)
    guest_run(kg, alice, vm, "cat /m", "kill-marker")
    kg.ok("hibernate", vm, user=alice)  # a later hibernate cleans up and works
    assert json.loads(kg.ok("status", vm, "--json", user=alice).stdout)["state"] == "hibernated"


def test_progress_on_a_terminal(kg: Kvmgate, alice: str, vm: str) -> None:
    """Saves and restores show progress when stderr is a terminal (and not otherwise)."""
    import pty

    for verb in ("hibernate", "start"):
        leader, follower = pty.openpty()
        p = subprocess.Popen(
            [KVMGATE, verb, vm, "--owner", alice], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower
        )
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(60) == 0
        os.close(leader)
        assert re.search(rb"(transferring|checking): [0-9]+ MiB", out), out
    assert state(kg, alice, vm)["state"] == "running"


def test_a_vm_whose_admin_options_say_snapshot_refuses_to_hibernate(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    """The review's bug: only the user's -snapshot was checked, so a VM whose admin
    fixed -snapshot hibernated and lost its overlay. It must refuse and keep running."""
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest), "-snapshot")
    cleanup_vms.append((alice, vm_name))
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    guest_run(kg, alice, vm_name, "echo kept > /m; echo wr''ote", "wrote")
    r = kg("hibernate", vm_name, user=alice)
    assert r.returncode == 5 and "-snapshot" in r.stderr, r.stderr
    assert state(kg, alice, vm_name)["state"] == "running"
    assert "kept" in guest_run(kg, alice, vm_name, "cat /m; echo do''ne", "done")


def test_a_hibernated_vm_is_not_a_trap(kg: Kvmgate, alice: str, bob: str, vm: str) -> None:
    """Its owner could not discard the saved state, and `admin delete` silently
    threw it away. `stop --discard` discards it (the owner's or root's), plain
    `stop` says so, and `admin delete` needs --force."""
    kg.ok("hibernate", vm, user=alice)
    r = kg("stop", vm, user=alice)
    assert r.returncode == 5 and f"kvmgate stop {vm} --discard" in r.stderr, r.stderr
    r = kg("admin", "delete", vm, "--owner", alice)
    assert r.returncode == 5 and "hibernated" in r.stderr and "--force" in r.stderr, r.stderr
    r = kg("stop", vm, "--discard", user=bob)
    assert r.returncode == 4, "not bob's: it does not exist for him"
    assert state(kg, alice, vm)["state"] == "hibernated"
    out = kg.ok("stop", vm, "--discard", user=alice).stdout
    assert f"discarded the saved state of {vm}" in out
    assert state(kg, alice, vm)["state"] == "stopped"
    r = kg("stop", vm, "--discard", user=alice)
    assert r.returncode == 5 and "not hibernated" in r.stderr
    assert "started" in kg.ok("start", vm, user=alice).stdout, "a fresh boot, not a restore"
    kg.ok("console", vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)


def test_a_restore_whose_file_is_gone_names_it_and_the_way_out(kg: Kvmgate, alice: str, vm: str) -> None:
    extra = Path(f"~{alice}").expanduser() / f"extra-{vm}.img"
    subprocess.run(["runuser", "-u", alice, "--", "truncate", "-s", "8M", str(extra)], check=True)
    kg.ok("stop", vm, "--force", user=alice)
    kg.ok("start", vm, "--", "-hdb", str(extra), user=alice)
    kg.ok("console", vm, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    kg.ok("hibernate", vm, user=alice)
    extra.unlink()
    r = kg("start", vm, user=alice)
    assert r.returncode == 3, r.stderr
    assert str(extra) in r.stderr and f"kvmgate stop {vm} --discard" in r.stderr, r.stderr
    assert state(kg, alice, vm)["state"] == "hibernated", "nothing was lost"
    kg.ok("stop", vm, "--discard", user=alice)
    assert "started" in kg.ok("start", vm, user=alice).stdout


def test_deleting_a_running_vm_needs_force(kg: Kvmgate, alice: str, vm: str, cleanup_vms: list) -> None:
    pid = state(kg, alice, vm)["pid"]
    r = kg("admin", "delete", vm, "--owner", alice)
    assert r.returncode == 5 and "--force" in r.stderr
    kg.ok("admin", "delete", vm, "--owner", alice, "--force")
    cleanup_vms.remove((alice, vm))
    assert gone(pid), "QEMU was ended"
    assert kg("status", vm, user=alice).returncode == 4


def test_a_hibernated_vms_disks_stay_its_own(
    kg: Kvmgate, alice: str, vm: str, vm_name: str, guest: Path, cleanup_vms: list
) -> None:
    """Another VM could open a hibernated VM's image read-write, and the restore
    went ahead on the changed disk. The image is held, by identity (a hard link
    or another path to it is the same image), until the VM is restored or its
    saved state discarded."""
    home = Path(f"~{alice}").expanduser()
    image, alias = home / f"shared-{vm}.img", home / f"alias-{vm}.img"
    subprocess.run(["runuser", "-u", alice, "--", "truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["runuser", "-u", alice, "--", "ln", str(image), str(alias)], check=True)
    other = f"{vm_name}b"
    kg.ok("admin", "create", other, "--owner", alice, "--", *boot_options(guest))
    cleanup_vms.append((alice, other))
    kg.ok("stop", vm, "--force", user=alice)
    kg.ok("start", vm, "--", "-hdb", str(image), user=alice)
    kg.ok("hibernate", vm, user=alice)
    for path in (image, alias):
        r = kg("start", other, "--", "-hdb", str(path), user=alice)
        assert r.returncode == 3, r.stderr
        assert f"-hdb {path}: held by your hibernated VM {vm} until it is restored" in r.stderr, r.stderr
    assert "started" in kg.ok("start", other, "--", "-hdb", str(image), "-snapshot", user=alice).stdout, (
        "read-only (a -snapshot base) is fine"
    )
    kg.ok("stop", other, "--force", user=alice)
    assert "restored" in kg.ok("start", vm, user=alice).stdout
    kg.ok("stop", vm, "--force", user=alice)
    assert "started" in kg.ok("start", other, "--", "-hdb", str(image), user=alice).stdout, "released"


def boot_id(kg: Kvmgate, user: str, name: str) -> str:
    out = guest_run(kg, user, name, "echo boot=$(cat /proc/sys/kernel/random/boot_id)", r"boot=[0-9a-f-]{36}\s")
    return str(re.findall(r"boot=([0-9a-f-]{36})", out)[-1])


def test_reset_reboots_the_guest_at_once(kg: Kvmgate, alice: str, bob: str, vm: str) -> None:
    before = boot_id(kg, alice, vm)
    assert kg("reset", vm, user=bob).returncode == 4, "not bob's"
    assert kg.ok("reset", vm, user=alice).stdout == f"reset {vm}\n"
    deadline = time.monotonic() + 120
    while True:  # the marker is computed by the guest's shell: old console output never matches it
        marker = f"after{secrets.token_hex(3)}"
        command = f"echo {marker}-$((6*7)) $(cat /proc/sys/kernel/random/boot_id)"
        r = kg("console", vm, "--expect", f"{marker}-42 [0-9a-f-]{{36}}", "--timeout", "5", user=alice,
               input=command + "\n")  # fmt: skip
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, "the guest came back"
    after = re.findall(rf"{marker}-42 ([0-9a-f-]{{36}})", r.stdout)[-1]
    assert after != before, "the guest booted again (a new boot id; uptime is no measure under load)"
    assert state(kg, alice, vm)["state"] == "running"


def test_status_says_what_its_owner_asks_next(kg: Kvmgate, alice: str, vm: str) -> None:
    """status showed no memory, vCPUs, uptime, logoff policy or how the last run ended."""
    st = state(kg, alice, vm)
    assert (st["memory_mib"], st["vcpus"], st["on_logoff"], st["logoff_delay"], st["forwards"]) == (
        256, 1, "none", 60, [],
    )  # fmt: skip
    assert st["started_at"].endswith("Z") and 0 <= st["uptime_seconds"] < 3600
    assert "uptime_seconds: " in kg.ok("status", vm, user=alice).stdout
    kg.ok("stop", vm, "--force", user=alice)
    assert state(kg, alice, vm)["last_run"]["how"] == "quit"
    kg.ok("start", vm, user=alice)
    os.kill(state(kg, alice, vm)["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state(kg, alice, vm)["state"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state(kg, alice, vm)["last_run"]["how"].startswith("QEMU exited by itself")
    run = Path(state(kg, alice, vm)["directory"], "log", "run.json")
    record = json.loads(run.read_text())
    run.write_text(json.dumps({**record, "boot_id": "an-earlier-boot"}))  # as after a host crash
    assert state(kg, alice, vm)["last_run"]["how"].startswith("killed at host crash")


def test_log_follow_shows_new_output_until_the_vm_stops(kg: Kvmgate, alice: str, vm: str) -> None:
    follow = subprocess.Popen(
        ["runuser", "-u", alice, "--", KVMGATE, "log", vm, "--follow"], stdout=subprocess.PIPE, text=True
    )
    try:
        guest_run(kg, alice, vm, "echo follow-$((6*7))", "follow-42")
        kg.ok("stop", vm, "--force", user=alice)
        out, _ = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert follow.returncode == 0 and "follow-42" in out


def test_host_shutdown_hibernates_and_boot_restores_each_as_it_was(
    kg: Kvmgate, users, guest: Path, vm_name: str, cleanup_vms: list
) -> None:
    """Like libvirt-guests with ON_SHUTDOWN=suspend: at shutdown, running and paused
    VMs are hibernated in parallel; a -snapshot VM is powered down and the record
    says why; at boot, each is restored into the state it was in."""
    owner = users.make("kgh")
    names = [f"{vm_name}{i}" for i in range(3)]
    for n in names:
        kg.ok("admin", "create", n, "--owner", owner, "--", *boot_options(guest))
        cleanup_vms.append((owner, n))
    running, paused, throwaway = names
    for n in names:
        kg.ok("start", n, "--owner", owner, *(["--", "-snapshot"] if n == throwaway else []))
    for n in names:
        kg.ok("console", n, "--owner", owner, "--expect", BOOT_LINE, "--timeout", "120")
    kg.ok("freeze", paused, "--owner", owner)
    out = kg.ok("admin", "shutdown", "--owner", owner, "--timeout", "120").stdout
    assert f"{owner}/{running}: hibernated" in out and f"{owner}/{paused}: hibernated" in out, out
    assert f"{owner}/{throwaway}: powered down at host shutdown" in out and "-snapshot" in out, out
    states = {n: kg.json("status", n, "--owner", owner) for n in names}
    assert [states[n]["state"] for n in names] == ["hibernated", "hibernated", "stopped"]
    assert states[throwaway]["last_run"]["how"] in ("powered down", "killed after timeout")
    out = kg.ok("admin", "boot", "--owner", owner, "--timeout", "120").stdout
    assert out.count("restored (pid") == 2, out
    assert kg.json("status", running, "--owner", owner)["state"] == "running"
    assert kg.json("status", paused, "--owner", owner)["state"] == "paused", "restored as it was"
    assert kg.json("status", throwaway, "--owner", owner)["state"] == "stopped"
    assert "restored" not in kg.ok("admin", "boot", "--owner", owner).stdout, "the list is emptied"


def test_a_snapshot_is_what_loadvm_starts_from(
    kg: Kvmgate, alice: str, vm_name: str, guest: Path, cleanup_vms: list
) -> None:
    """The owner had no way to make a VM-state snapshot, so every -loadvm failed."""
    name = f"{vm_name}s"
    kg.ok("admin", "create", name, "--owner", alice, "--disk-size", "64M", "--", *boot_options(guest))
    cleanup_vms.append((alice, name))
    kg.ok("start", name, user=alice)
    kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    guest_run(kg, alice, name, "echo snap-$((6*7)) > /m; echo wr''ote", "wrote")
    out = kg.ok("snapshot", name, "before-change", user=alice).stdout
    assert f"kvmgate start {name} -- -loadvm before-change" in out
    assert [r["tag"] for r in kg.json("snapshot", name, "--list", user=alice)] == ["before-change"]
    r = kg("snapshot", name, "before-change", user=alice)
    assert r.returncode == 5 and "already has a snapshot" in r.stderr
    guest_run(kg, alice, name, "rm /m; echo rem''oved", "removed")
    kg.ok("stop", name, "--force", user=alice)
    assert [r["tag"] for r in kg.json("snapshot", name, "--list", user=alice)] == ["before-change"], "stopped too"
    kg.ok("start", name, "--", "-loadvm", "before-change", user=alice)
    guest_run(kg, alice, name, "cat /m", "snap-42")
    assert kg("snapshot", name, "--delete", "nosuch", user=alice).returncode == 3
    kg.ok("snapshot", name, "--delete", "before-change", user=alice)
    assert kg.json("snapshot", name, "--list", user=alice) == []
    assert kg("snapshot", name, "Bad Tag", user=alice).returncode == 2


def test_a_snapshot_of_a_raw_disk_is_refused(kg: Kvmgate, alice: str, vm: str) -> None:
    disk = Path(f"~{alice}").expanduser() / f"raw-{vm}.img"
    subprocess.run(["runuser", "-u", alice, "--", "truncate", "-s", "8M", str(disk)], check=True)
    kg.ok("stop", vm, "--force", user=alice)
    kg.ok("start", vm, "--", "-hdb", str(disk), user=alice)
    r = kg("snapshot", vm, "x", user=alice)
    assert r.returncode == 3 and f"-hdb {disk} is raw: snapshots need qcow2 disks" in r.stderr, r.stderr
