"""Self-service as real users: the admin writes templates and grants, users make,
use and delete their own VMs within quotas that hold under races, and a
running-memory budget hibernates the least recently used VM instead of
refusing (docs/policy.md, "Templates", "Grants", "Running-memory budgets")."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import pytest

from ..conftest import (
    BOOT_LINE,
    DEFAULT_POLICY,
    ETC,
    KVMGATE,
    LOG,
    STATE,
    Kvmgate,
    Users,
    as_user,
    boot_options,
    popen_as,
)

GRANTS = Path(ETC, "grants.toml")
TEMPLATES = Path(ETC, "templates")


@pytest.fixture
def selfservice(kg: Kvmgate) -> Iterator[None]:
    """No templates or grants before and after each test."""
    _clear()
    yield
    _clear()


def _clear() -> None:
    shutil.rmtree(TEMPLATES, ignore_errors=True)
    GRANTS.unlink(missing_ok=True)
    Path(STATE, "selfservice.good.json").unlink(missing_ok=True)


@pytest.fixture
def person(users: Users, kg: Kvmgate) -> Iterator[str]:
    """A fresh user whose VMs are all deleted afterwards."""
    name = users.make("kgs")
    yield name
    _delete_all(kg, name)


def _delete_all(kg: Kvmgate, owner: str) -> None:
    for vm in kg.json("admin", "list"):  # type: ignore[union-attr]
        if vm["owner"] == owner:
            kg("admin", "delete", vm["name"], "--owner", owner, "--force")


def _vms_of(kg: Kvmgate, owner: str) -> list[str]:
    return sorted(v["name"] for v in kg.json("admin", "list") if v["owner"] == owner)  # type: ignore[union-attr]


def _audit(**match: str) -> list[dict[str, object]]:
    out = []
    for line in Path(LOG, "audit.log").read_text().splitlines():
        rec = json.loads(line)
        if all(str(rec.get(k)) == v for k, v in match.items()):
            out.append(rec)
    return out


def test_an_admin_writes_a_template_and_a_grant_and_a_user_makes_uses_and_deletes_a_vm(
    kg: Kvmgate, selfservice: None, person: str, guest: Path
) -> None:
    kg.ok("admin", "template", "add", "small", "--disk-size", "64M", "--max-disk-size", "256M",
          "--description", "a small test VM", "--", *boot_options(guest))  # fmt: skip
    assert (TEMPLATES / "small.toml").stat().st_mode & 0o777 == 0o644
    kg.ok("admin", "grant", person, "--templates", "small", "--vms", "2", "--memory", "1G", "--disk", "1G",
          "--ports", "2")  # fmt: skip
    assert kg.ok("admin", "template", "check").stdout.startswith("ok:")

    listed = kg.json("templates", user=person)
    assert [t["name"] for t in listed] == ["small"]  # type: ignore[index]
    assert listed[0]["memory_mib"] == 256 and listed[0]["description"] == "a small test VM"  # type: ignore[index]

    kg.ok("create", "dev", "--template", "small", "--disk-size", "128M", user=person)
    shown = kg.json("admin", "show", "dev", "--owner", person)
    assert shown["template"] == "small" and shown["template_drift"] == "none"  # type: ignore[index]
    quota = kg.json("quota", user=person)
    use = {r["resource"]: r for r in quota["resources"]}  # type: ignore[index]
    assert use["vms"]["used"] == 1 and use["vms"]["limit"] == 2
    assert use["memory"]["used"] == 256 and use["disk_virtual"]["used"] == 128 << 20
    assert 0 < use["disk_real"]["used"] < 1 << 20

    # An ordinary kvmgate VM: start, console, stop.
    kg.ok("start", "dev", user=person)
    kg.ok("console", "dev", "--expect", BOOT_LINE, "--timeout", "90", user=person)
    assert kg.json("quota", user=person)["resources"][2]["used"] == 256  # type: ignore[index]  # running memory
    kg.ok("stop", "dev", "--force", user=person)

    # Editing the template leaves the VM as it was made; admin show marks the drift.
    kg.ok("admin", "template", "add", "small", "--disk-size", "64M", "--", *boot_options(guest)[2:], "-m", "200")
    shown = kg.json("admin", "show", "dev", "--owner", person)
    assert shown["template_drift"].startswith("changed")  # type: ignore[index]
    assert "256" in shown["options"]  # type: ignore[index]

    kg.ok("delete", "dev", user=person)
    assert _vms_of(kg, person) == []
    assert kg.json("quota", user=person)["resources"][0]["used"] == 0  # type: ignore[index]
    assert _audit(verb="create", vm="dev", owner=person) and _audit(verb="delete", vm="dev", owner=person)


def test_bad_requests_are_one_line_refusals_that_leave_nothing_behind(
    kg: Kvmgate, selfservice: None, person: str, bob: str, guest: Path, cleanup_vms: list
) -> None:
    kg.ok("admin", "template", "add", "small", "--disk-size", "32M", "--max-disk-size", "64M", "--", "-m", "64")
    kg.ok("admin", "template", "add", "secret", "--disk-size", "32M", "--", "-m", "64")
    kg.ok("admin", "grant", person, "--templates", "small", "--vms", "1", "--memory", "128M")
    kg.ok("create", "one", "--template", "small", user=person)
    kg.ok("admin", "create", "theirs", "--owner", bob, "--", "-m", "64")
    cleanup_vms.append((bob, "theirs"))
    kg.ok("admin", "create", "given", "--owner", person, "--", "-m", "64")
    kg("admin", "show", "one", "--owner", person)  # prime the policy cache before the snapshot
    kg("templates", user=person)
    before = kg.state_snapshot()

    def refused(code: int, *args: str) -> str:
        r = kg(*args, user=person)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvmgate: "), r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        return r.stderr

    missing = refused(3, "create", "two", "--template", "nosuch")
    ungranted = refused(3, "create", "two", "--template", "secret")
    assert missing.replace("nosuch", "X") == ungranted.replace("secret", "X")
    # "given" was made by the admin for this user: it counts toward the VM quota (1 of 1)
    over = refused(3, "create", "two", "--template", "small")
    assert "vms quota" in over and "you use 2 of 1" in over
    assert "over template small's maximum" in refused(3, "create", "two", "--template", "small", "--disk-size", "1G")
    assert "already have a VM named one" in refused(5, "create", "one", "--template", "small")
    not_theirs = refused(4, "delete", "theirs")
    assert not_theirs.replace("theirs", "X") == refused(4, "delete", "nosuch").replace("nosuch", "X")
    assert "made by the administrator" in refused(3, "delete", "given")
    refused(2, "create", "two", "--template", "small", "--disk-size", "\uff11G")
    refused(2, "create", "Two", "--template", "small")
    assert kg.state_snapshot() == before
    assert kg.json("admin", "show", "theirs", "--owner", bob)["state"] == "stopped"  # type: ignore[index]


def test_a_broken_grant_file_is_reported_to_the_admin_and_users_keep_the_last_good_one(
    kg: Kvmgate, selfservice: None, person: str
) -> None:
    kg.ok("admin", "template", "add", "small", "--disk-size", "32M", "--", "-m", "64")
    kg.ok("admin", "grant", person, "--templates", "small", "--vms", "2")
    assert [t["name"] for t in kg.json("templates", user=person)] == ["small"]  # type: ignore[index]
    GRANTS.write_text(GRANTS.read_text() + "\n[user.x]\nvms = 'many'\n")
    check = kg("admin", "template", "check")
    assert check.returncode == 3
    assert f"{GRANTS}:" in check.stdout and "vms" in check.stdout, check.stdout
    line = int(check.stdout.split(f"{GRANTS}:", 1)[1].split(":", 1)[0])
    assert GRANTS.read_text().splitlines()[line - 1].startswith("[user.x]")
    as_json = json.loads(kg("admin", "template", "check", "--json").stdout)
    assert as_json["ok"] is False and len(as_json["errors"]) == 1
    # Users keep the last good set; the admin's listing warns.
    assert [t["name"] for t in kg.json("templates", user=person)] == ["small"]  # type: ignore[index]
    assert "warning" in kg.ok("admin", "template", "list").stdout
    kg.ok("create", "still", "--template", "small", user=person)
    # admin grant will not rewrite a file it cannot read
    r = kg("admin", "grant", person, "--templates", "small")
    assert r.returncode == 3 and "fix it first" in r.stderr
    # A TOML error too, with its line.
    GRANTS.write_text("[user.a\n")
    check = kg("admin", "template", "check")
    assert check.returncode == 3 and f"{GRANTS}:1:" in check.stdout


def test_twenty_concurrent_creates_never_pass_the_quota(kg: Kvmgate, selfservice: None, person: str) -> None:
    kg.ok("admin", "template", "add", "tiny", "--disk-size", "16M", "--", "-m", "32")
    kg.ok("admin", "grant", person, "--templates", "tiny", "--vms", "5", "--memory", "1G")
    procs = [popen_as(person, [KVMGATE, "create", f"r{i}", "--template", "tiny"], stderr=PIPE) for i in range(20)]
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        codes.append((p.returncode, err))
    ok = [c for c, _ in codes if c == 0]
    assert len(ok) == 5, codes
    assert all(c == 3 and "vms quota" in e for c, e in codes if c != 0), codes
    assert len(_vms_of(kg, person)) == 5
    # and the memory quota the same way: 5 x 32 MiB defined
    assert kg.json("quota", user=person)["resources"][1]["used"] == 160  # type: ignore[index]


def test_disk_use_is_measured_and_past_the_real_bytes_quota_the_vm_pauses_and_says_why(
    kg: Kvmgate, selfservice: None, person: str, guest: Path
) -> None:
    kg.ok("admin", "template", "add", "disk", "--disk-size", "64M", "--", *boot_options(guest))
    kg.ok("admin", "grant", person, "--templates", "disk", "--disk", "100M", "--vms", "3")
    kg.ok("create", "filler", "--template", "disk", user=person)
    # The owner puts 40 MiB into the VM's disks/ directory by hand: it is measured, not trusted.
    disks = Path(kg.json("admin", "show", "filler", "--owner", person)["directory"], "disks")  # type: ignore[index]
    as_user(person, ["dd", "if=/dev/urandom", f"of={disks}/junk", "bs=1M", "count=40", "status=none"], check=True)
    real = kg.json("quota", user=person)["resources"][4]["used"]  # type: ignore[index]
    assert real >= 40 << 20
    r = kg("create", "more", "--template", "disk", user=person)
    assert r.returncode == 3 and "disk (virtual size) quota" in r.stderr, r.stderr
    # Over the quota (40 MiB more of virtual size, as a raw file would be): the start is refused.
    r = kg("start", "filler", user=person)
    assert r.returncode == 3 and "over your disk quota" in r.stderr, r.stderr
    as_user(person, ["mkdir", f"{disks}/stash"], check=True)
    as_user(person, ["mv", f"{disks}/junk", f"{disks}/stash/junk"], check=True)  # now real bytes only
    # A disk made sparse by its owner could grow past any file size limit: refused.
    disk = disks / "disk0.qcow2"
    size = disk.stat().st_size
    as_user(person, ["truncate", "-s", "1G", str(disk)], check=True)
    r = kg("start", "filler", user=person)
    assert r.returncode == 3 and "sparse disk" in r.stderr, r.stderr
    as_user(person, ["truncate", "-s", str(size), str(disk)], check=True)
    kg.ok("start", "filler", user=person)
    try:
        kg.ok("console", "filler", "--expect", BOOT_LINE, "--timeout", "90", user=person)
        kg("console", "filler", "--timeout", "2", user=person,
           input="dd if=/dev/urandom of=/dev/sda bs=1M count=63 conv=fsync; echo dd-exit=$?\n")  # fmt: skip
        deadline = time.monotonic() + 120
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = kg.json("status", "filler", user=person)  # type: ignore[assignment]
            if status.get("qemu_status") == "io-error":
                break
            time.sleep(1)
        assert status.get("qemu_status") == "io-error", status
        assert status["state"] == "paused" and "disk quota" in str(status["note"])
        assert disk.stat().st_size <= (100 << 20) - real + (1 << 20)
        # A hibernate is not bounded by the disk quota (the state is root's file).
        kg.ok("hibernate", "filler", user=person)
        assert kg.json("status", "filler", user=person)["state"] == "hibernated"  # type: ignore[index]
    finally:
        kg("stop", "filler", "--force", user=person)
        kg("stop", "filler", "--discard", user=person)


def test_measuring_disk_use_never_follows_the_owners_links(kg: Kvmgate, selfservice: None, person: str) -> None:
    """The owner controls disks/: a link to a directory they cannot read is not
    entered, so the quota's totals tell them nothing about other people's files."""
    kg.ok("admin", "template", "add", "tiny", "--disk-size", "16M", "--", "-m", "32")
    kg.ok("admin", "grant", person, "--templates", "tiny", "--disk", "1G")
    kg.ok("create", "peek", "--template", "tiny", user=person)
    secret = Path(STATE, "peek-secret")
    secret.mkdir(mode=0o700, exist_ok=True)
    try:
        with open(secret / "big", "wb") as f:
            f.write(os.urandom(8 << 20))
        disks = Path(kg.json("admin", "show", "peek", "--owner", person)["directory"], "disks")  # type: ignore[index]
        before = kg.json("quota", user=person)["resources"][4]["used"]  # type: ignore[index]
        as_user(person, ["ln", "-s", str(secret), f"{disks}/peek"], check=True)
        after = kg.json("quota", user=person)["resources"][4]["used"]  # type: ignore[index]
        assert after - before < 1 << 20, (before, after)
    finally:
        shutil.rmtree(secret)


@pytest.fixture
def budget_template(kg: Kvmgate, selfservice: None, guest: Path) -> None:
    kg.ok("admin", "template", "add", "yield", "--disk-size", "16M", "--on-pressure", "hibernate",
          "--", *boot_options(guest))  # fmt: skip
    kg.ok("admin", "template", "add", "keep", "--disk-size", "16M", "--", *boot_options(guest))


def _booted(kg: Kvmgate, owner: str, name: str) -> None:
    kg.ok("start", name, user=owner)
    kg.ok("console", name, "--expect", BOOT_LINE, "--timeout", "120", user=owner)


def test_the_running_memory_quota_hibernates_the_least_recently_used_vm(
    kg: Kvmgate, budget_template: None, person: str
) -> None:
    kg.ok("admin", "grant", person, "--templates", "yield,keep", "--vms", "4", "--running-memory", "512M")
    for n in ("a", "b", "c"):
        kg.ok("create", n, "--template", "yield", user=person)
    kg.ok("create", "k", "--template", "keep", user=person)
    try:
        _booted(kg, person, "a")
        _booted(kg, person, "b")
        time.sleep(1.1)
        kg.ok("console", "a", "--timeout", "1", user=person)  # a is used after b: b is the least recently used
        # A start refused for any reason (here a missing file) hibernates nothing.
        r = kg("start", "c", "--", "-cdrom", "/nonexistent/x.iso", user=person)
        assert r.returncode != 0 and "x.iso" in r.stderr, r.stderr
        assert kg.json("status", "b", user=person)["state"] == "running"  # type: ignore[index]
        out = kg.ok("start", "c", user=person)
        assert "started c" in out.stdout
        states = {n: kg.json("status", n, user=person) for n in ("a", "b", "c")}
        assert states["a"]["state"] == "running" and states["c"]["state"] == "running"  # type: ignore[index]
        assert states["b"]["state"] == "hibernated"  # type: ignore[index]
        how = states["b"]["last_run"]["how"]  # type: ignore[index]
        assert "to make room for your VM c" in how and "running-memory quota of 512 MiB" in how
        assert "to make room for your VM c" in kg.ok("log", "b", user=person).stdout
        assert _audit(verb="hibernate", vm="b", owner=person, caller="memory-budget")
        # A VM whose template says refuse is never chosen, even when it is the least recently used.
        for n in ("a", "c"):
            kg.ok("stop", n, "--force", user=person)
        kg.ok("stop", "b", "--discard", user=person)
        _booted(kg, person, "k")
        time.sleep(1.1)
        _booted(kg, person, "a")
        kg.ok("start", "c", user=person)
        assert kg.json("status", "a", user=person)["state"] == "hibernated"  # type: ignore[index]
        assert kg.json("status", "k", user=person)["state"] == "running"  # type: ignore[index]
        # A restore is a start too: thawing a makes room by hibernating c.
        kg.ok("thaw", "a", user=person)
        assert kg.json("status", "c", user=person)["state"] == "hibernated"  # type: ignore[index]
        assert kg.json("status", "a", user=person)["state"] == "running"  # type: ignore[index]
    finally:
        for n in ("a", "b", "c", "k"):
            kg("stop", n, "--force", user=person)


def test_the_running_memory_quota_refuses_when_nothing_may_be_hibernated_and_changes_nothing(
    kg: Kvmgate, budget_template: None, person: str
) -> None:
    kg.ok("admin", "grant", person, "--templates", "keep", "--vms", "2", "--running-memory", "256M")
    kg.ok("create", "k1", "--template", "keep", user=person)
    kg.ok("create", "k2", "--template", "keep", user=person)
    try:
        _booted(kg, person, "k1")
        r = kg("start", "k2", user=person)
        assert r.returncode == 3, r.stderr
        assert "running-memory quota" in r.stderr and "256 MiB of 256 MiB" in r.stderr, r.stderr
        assert kg.json("status", "k1", user=person)["state"] == "running"  # type: ignore[index]
        assert kg.json("status", "k2", user=person)["state"] == "stopped"  # type: ignore[index]
        # root's start is never refused by a user's quota
        kg.ok("start", "k2", "--owner", person)
    finally:
        for n in ("k1", "k2"):
            kg("stop", n, "--force", user=person)


def test_the_hosts_budget_hibernates_the_hosts_least_recently_used_vm_that_allows_it(
    kg: Kvmgate, selfservice: None, users: Users, guest: Path
) -> None:
    one, two = users.make("kgh"), users.make("kgh")
    try:
        kg.ok("admin", "create", "x", "--owner", one, "--on-pressure", "hibernate", "--", *boot_options(guest))
        kg.ok("admin", "create", "y", "--owner", two, "--", *boot_options(guest))
        kg.ok("admin", "create", "z", "--owner", two, "--", *boot_options(guest))
        kg.write_policy("running_memory_budget_mib = 512\n" + DEFAULT_POLICY)
        _booted(kg, one, "x")
        _booted(kg, two, "y")
        kg.ok("start", "z", user=two)
        assert kg.json("status", "x", user=one)["state"] == "hibernated"  # type: ignore[index]
        how = kg.json("status", "x", user=one)["last_run"]["how"]  # type: ignore[index]
        assert "to make room for another VM (the host's running-memory budget of 512 MiB)" in how
        assert two not in how and "z" not in how.split("(")[0]  # another owner's VM is not named
        # Nothing else may go now: a further start is refused, and nothing changes.
        kg.ok("admin", "create", "w", "--owner", one, "--", "-m", "64")
        r = kg("start", "w", user=one)
        assert r.returncode == 3 and "host's running-memory budget is full" in r.stderr, r.stderr
        assert kg.json("status", "y", user=two)["state"] == "running"  # type: ignore[index]
    finally:
        kg.write_policy(DEFAULT_POLICY)
        for o in (one, two):
            _delete_all(kg, o)


def test_only_gated_may_report_a_use(kg: Kvmgate, selfservice: None, person: str) -> None:
    kg.ok("admin", "create", "g", "--owner", person, "--", "-m", "64")
    res = kg("gated-used", f"{person}:g", user=person)
    assert res.returncode == 3 and "only kvmgate-gated" in res.stderr, res.stderr
    assert not _audit(verb="used (a connection through kvmgate-gated)", vm="g")
