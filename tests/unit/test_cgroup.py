"""The cgroup backends: a systemd scope where systemd runs, kvmgate's own group
elsewhere (v2 or v1), nothing without a memory controller. The systemd host is
simulated here (no systemd as PID 1); the own-group path also runs for real in
the integration tests (`test_memory_is_capped_by_the_cgroup`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmgate.host import cgroup, scope


def test_the_scope_request_is_well_formed() -> None:
    argv = scope.scope_argv("abc123", 4242, 512 << 20)
    assert argv[:8] == [
        "/usr/bin/busctl", "call", "--system", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
    ]  # fmt: skip
    assert argv[8:10] == ["kvmgate-abc123-4242.scope", "fail"] and argv[-1] == "0"  # no auxiliary units
    count, rest = int(argv[10]), argv[11:-1]
    props = {}
    i = 0
    for _ in range(count):  # name, D-Bus signature, value words
        name, sig = rest[i], rest[i + 1]
        width = 2 if sig == "au" else 1
        props[name] = (sig, rest[i + 2 : i + 2 + width])
        i += 2 + width
    assert i == len(rest)
    assert props == {
        "PIDs": ("au", ["1", "4242"]),
        "Slice": ("s", ["kvmgate.slice"]),
        "Delegate": ("b", ["true"]),
        "MemoryMax": ("t", [str(512 << 20)]),
        "MemorySwapMax": ("t", ["0"]),
        "CollectMode": ("s", ["inactive-or-failed"]),
    }


def test_on_systemd_hosts_kvmgate_writes_nothing_into_systemds_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroup, "ROOT", str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(cgroup, "systemd_booted", lambda: True)
    monkeypatch.setattr(cgroup, "BUSCTL", "/bin/true")
    asked: list[tuple[str, int, int]] = []
    monkeypatch.setattr(scope, "start", lambda key, pid, limit: asked.append((key, pid, limit)))
    cgroup.Placement("k1", 1 << 30).place(77)
    assert asked == [("k1", 77, 1 << 30)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgroup.controllers"]


def test_systemd_without_busctl_keeps_kvmgates_own_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "ROOT", str(tmp_path))
    monkeypatch.setattr(cgroup, "systemd_booted", lambda: True)
    monkeypatch.setattr(cgroup, "BUSCTL", str(tmp_path / "no-busctl"))
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")
    cgroup.Placement("k5", 100 << 20).place(55)
    assert (tmp_path / "memory" / "kvmgate" / "k5" / "cgroup.procs").read_text() == "55"


def test_without_systemd_kvmgate_uses_its_own_v2_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "ROOT", str(tmp_path))
    monkeypatch.setattr(cgroup, "systemd_booted", lambda: False)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "kvmgate").mkdir()
    (tmp_path / "kvmgate" / "cgroup.subtree_control").write_text("")
    cgroup.Placement("k2", 300 << 20).place(88)
    assert (tmp_path / "kvmgate" / "k2" / "memory.max").read_text() == str(300 << 20)
    assert (tmp_path / "kvmgate" / "k2" / "cgroup.procs").read_text() == "88"


def test_without_systemd_on_v1_the_memory_hierarchy_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "ROOT", str(tmp_path))
    monkeypatch.setattr(cgroup, "systemd_booted", lambda: False)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("max")
    cgroup.Placement("k3", 200 << 20).place(99)
    assert (tmp_path / "memory" / "kvmgate" / "k3" / "memory.limit_in_bytes").read_text() == str(200 << 20)
    assert (tmp_path / "memory" / "kvmgate" / "k3" / "cgroup.procs").read_text() == "99"


def test_no_memory_controller_places_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "ROOT", str(tmp_path))
    monkeypatch.setattr(cgroup, "systemd_booted", lambda: False)
    cgroup.Placement("k4", 1 << 20).place(1)
    assert list(tmp_path.iterdir()) == []
