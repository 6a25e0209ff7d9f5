"""The owner map's format and rules (model/ownermap.py) and the guest's reader
(guest/kvmgate-shares), against each other: what the host writes, the guest
reads whole or not at all, and no value reaches exports or smb.conf unless it
is a name or an address. The generated smb.conf is checked by Samba's testparm."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.model import ownermap as om

REPO = Path(__file__).resolve().parents[2]


def _agent():  # type: ignore[no-untyped-def]
    loader = importlib.machinery.SourceFileLoader("kvmgate_shares", str(REPO / "guest/kvmgate-shares"))
    spec = importlib.util.spec_from_loader("kvmgate_shares", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvmgate_shares"] = mod
    loader.exec_module(mod)
    return mod


agent = _agent()

owners = st.from_regex(r"[a-z_][a-z0-9_.-]{0,31}", fullmatch=True)
names = st.from_regex(r"[a-z][a-z0-9]{0,7}(-[a-z0-9]{1,4})?", fullmatch=True)
ips = st.tuples(*[st.integers(0, 255)] * 2).map(lambda t: f"10.77.{t[0]}.{t[1]}")
rows = st.lists(st.builds(om.Row, st.sampled_from(["services", "svc2"]), ips, owners, names), max_size=30)


@given(st.integers(0, 10**19), st.binary(max_size=4096))
def test_a_slot_reads_back_whole_in_host_and_guest(gen: int, body: bytes) -> None:
    raw = om.slot(gen, body)
    assert len(raw) == om.SLOT
    assert om.read_slot(raw) == (gen, body) == agent.read_slot(raw)


@given(rows, rows, st.integers(0, om.SLOT))
def test_a_read_racing_a_write_sees_the_old_map_or_the_new_never_half(a: list, b: list, torn: int) -> None:
    """The host writes the older slot; a guest reading mid-write gets a whole map."""
    old = om.slot(1, om.body(sorted(a), ["services"]))
    new = om.slot(2, om.body(sorted(b), ["services"]))
    file = [old, b"\0" * om.SLOT]
    target = om.older_slot([file[0][: om.HEADER], file[1][: om.HEADER]])
    assert target == 1
    file[target] = new[:torn] + file[target][torn:]
    got = agent.newest(file)
    assert got in ((1, om.body(sorted(a), ["services"])), (2, om.body(sorted(b), ["services"])))
    if torn == om.SLOT:
        assert got is not None and got[0] == 2


def test_a_header_torn_anywhere_never_passes_with_the_other_body() -> None:
    """Found by the property test below: a new generation over an old length and checksum."""
    body = b"services 10.77.0.2 alice a1\n"
    for old, new in ((om.slot(7, body), om.slot(8, b"")), (om.slot(7, b""), om.slot(8, body))):
        for cut in range(om.HEADER + 1):
            torn = new[:cut] + old[cut:]
            got = agent.read_slot(torn)
            assert got in (None, om.read_slot(old), om.read_slot(new)), cut
            assert om.read_slot(torn) == got


def _map_file(path: Path, slots: list[bytes]) -> None:
    path.write_bytes(b"".join(slots))


@settings(deadline=None, max_examples=50)  # 2 MiB of files per example: no deadline under a loaded CI machine
@given(rows, rows, st.integers(0, om.SLOT))
def test_the_guests_reader_takes_a_whole_map_from_a_file_however_the_write_was_cut(a: list, b: list, torn: int) -> None:
    """The real reader (guest/kvmgate-shares read_map) on a real file, maps far past a page."""
    many = [om.Row("services", f"10.77.{i // 250}.{i % 250 + 1}", f"u{i}", "vm") for i in range(600)]
    old_rows = tuple(sorted(set(a) | set(many)))
    old, new = om.slot(7, om.body(old_rows, ["services"])), om.slot(8, om.body(sorted(b), ["services"]))
    assert len(om.body(old_rows, ["services"])) > 4096
    d = Path(tempfile.mkdtemp())
    try:
        f = d / "map"
        _map_file(f, [new[:torn] + old[torn:], old])  # slot 0 half rewritten, slot 1 the old map
        got = agent.read_map(str(f))
        assert got is not None
        want_old = [tuple(r) for r in old_rows if r.network == "services"]
        want_new = [tuple(r) for r in sorted(b) if r.network == "services"]
        assert (got[0], got[1]) in ((7, want_old), (8, want_new))
        _map_file(f, [b"\0" * om.SLOT, old[: om.SLOT // 2] + b"x" * (om.SLOT // 2)])
        assert agent.read_map(str(f)) is None or agent.read_map(str(f))[0] == 7
    finally:
        shutil.rmtree(d)


def test_a_map_past_a_page_is_read_whole() -> None:
    many = [om.Row("services", f"10.77.{i // 250}.{i % 250 + 1}", f"u{i}", "vm") for i in range(2000)]
    d = Path(tempfile.mkdtemp())
    try:
        f = d / "map"
        _map_file(f, [om.slot(3, om.body(many, ["services"])), b"\0" * om.SLOT])
        got = agent.read_map(str(f))
        assert got is not None and got[0] == 3 and len(got[1]) == 2000
    finally:
        shutil.rmtree(d)


@given(rows)
def test_what_the_host_publishes_the_guest_parses_to_the_same_rows(r: list) -> None:
    state = om.publish(om.State(), r)
    body = om.body(state.rows, ["services", "svc2"])
    parsed = agent.parse_rows(body)
    assert parsed is not None and [om.Row(*p) for p in parsed] == list(state.rows)


@pytest.mark.parametrize(
    "line",
    [
        b"services 10.77.0.2 alice a1 extra",
        b"services 10.77.0.2 al ice a1",
        b"services 10.77.0.256 alice a1",
        b"services 10.77.0.2 Alice a1",
        b"services 10.77.0.2 alice/../bob a1",
        b"services 10.77.0.2 alice a1\r",
        b"services 10.77.0.2 ali\xc3\xa9 a1",
        b"services 10.77.0.2 -alice a1",
        b"services 010.77.0.2 alice a1",
        b"services 10.77.0.2 alice A1",
    ],
)
def test_one_bad_line_closes_the_whole_map(line: bytes) -> None:
    assert agent.parse_rows(b"services 10.77.0.9 bob b1\n" + line + b"\n") is None


def test_publish_moves_the_generation_only_on_change_and_holds_freed_addresses() -> None:
    a = om.Row("services", "10.77.0.2", "alice", "a1")
    b = om.Row("services", "10.77.0.3", "bob", "b1")
    s1 = om.publish(om.State(), [a, b])
    assert s1.generation == 1 and not s1.quarantine
    assert om.publish(s1, [b, a]) == s1, "the same map: the same generation"
    renamed = om.publish(s1, [a._replace(name="a2"), b])
    assert renamed.generation == 2 and not renamed.quarantine, "the same owner keeps the address"
    s2 = om.publish(s1, [b])
    assert s2.generation == 2 and s2.quarantine == (om.Quarantined("services", "10.77.0.2", 2),)
    s3 = om.publish(s1, [b, a._replace(owner="carol")])
    assert s3.quarantine == (om.Quarantined("services", "10.77.0.2", 2),), "a new owner for an address"


def test_a_freed_address_is_held_until_every_live_server_applied_a_map_without_it() -> None:
    b = om.Row("services", "10.77.0.3", "bob", "b1")
    s2 = om.publish(om.publish(om.State(), [om.Row("services", "10.77.0.2", "alice", "a1"), b]), [b])
    freed = ("services", "10.77.0.2")
    assert freed in om.held(s2, {"services": [2, 1]}, "carol", "c1"), "one server has not applied it"
    assert freed not in om.held(s2, {"services": [2, 2]}, "carol", "c1")
    assert freed not in om.held(s2, {"services": []}, "carol", "c1"), "no live server: nothing serves the old map"
    assert freed in om.held(s2, {"services": [1], "svc2": [9]}, "carol", "c1"), "other networks' servers do not count"
    assert ("services", "10.77.0.3") in om.held(s2, {}, "carol", "c1"), "another VM's address in the map"
    assert ("services", "10.77.0.3") not in om.held(s2, {}, "bob", "b1"), "a VM keeps its own"
    assert om.released(s2, {"services": [2]}).quarantine == ()


def test_a_lost_record_is_rebuilt_above_every_generation_and_fences_its_networks() -> None:
    r = om.rebuilt(seen=40, clock=10, networks=["services", "svc2"])
    assert r.generation == 40 and r.fence == (om.Fence("services", 41), om.Fence("svc2", 41))
    assert om.rebuilt(seen=40, clock=10**15, networks=[]).generation == 10**15
    b = om.Row("services", "10.77.0.3", "bob", "b1")
    s = om.publish(r, [b])
    assert s.generation == 41
    hosts = {"services": ["10.77.0.2", "10.77.0.3", "10.77.0.4"], "svc2": ["10.78.0.2"]}
    held = om.held(s, {"services": [40], "svc2": []}, "bob", "b1", hosts.__getitem__)
    assert held == {("services", "10.77.0.2"), ("services", "10.77.0.4")}, "all but bob's own, on the lagging network"
    assert om.held(s, {"services": [41], "svc2": []}, "carol", "c1", hosts.__getitem__) == {("services", "10.77.0.3")}
    assert om.parse_state(s.to_json()) == s


@given(rows, st.lists(st.integers(0, 5), max_size=3))
def test_held_never_frees_what_a_lagging_server_still_serves(r: list, lags: list) -> None:
    s1 = om.publish(om.State(), r)
    s2 = om.publish(s1, r[: len(r) // 2])
    acks = {"services": [max(0, s2.generation - lag) for lag in lags], "svc2": []}
    held = om.held(s2, acks, "nobody", "x")
    for q in s2.quarantine:
        if q.network == "services" and any(a < q.generation for a in acks["services"]):
            assert (q.network, q.ip) in held


def test_the_state_file_is_parsed_strictly() -> None:
    s = om.publish(om.State(), [om.Row("services", "10.77.0.2", "alice", "a1")])
    assert om.parse_state(s.to_json()) == s
    for bad in (
        '{"version": 2, "generation": 1, "rows": [], "quarantine": []}',
        '{"version": 1, "generation": -1, "rows": [], "quarantine": []}',
        '{"version": 1, "generation": 1, "rows": [["services", "10.77.0.2", "a b", "a1"]], "quarantine": []}',
        '{"version": 1, "generation": 1, "rows": [], "quarantine": [["services", "x", 1]]}',
        "[]",
        "not json",
    ):
        with pytest.raises(om.BadState):
            om.parse_state(bad)


@given(st.integers(0, 10**19))
def test_the_guests_answer_reads_back(gen: int) -> None:
    assert om.parse_ack(agent.ack(gen)) == gen
    assert om.parse_ack(b"kvmgate-ownermap-ack 1 12\n") == 0, "only the exact shape"
    assert om.parse_ack(b"\0" * 4096) == 0


def test_reserved_owner_names_get_no_share_and_uids_are_kept() -> None:
    shares = agent.by_owner([("services", "10.77.0.2", "homes", "h"), ("services", "10.77.0.3", "alice", "a")])
    assert list(shares) == ["alice"]
    uids = agent.assign_uids(["alice", "bob"], {"bob": 20007})
    assert uids == {"bob": 20007, "alice": 20008}
    assert agent.assign_uids(["alice"], uids) == uids
    assert agent.parse_uids("alice 20008\nbad name 1\nroot 0\n") == {"alice": 20008}


@pytest.mark.skipif(shutil.which("testparm") is None, reason="Samba's testparm is not installed")
def test_the_generated_smb_conf_passes_testparm(tmp_path: Path) -> None:
    shares = {"alice": ["10.77.0.2", "10.77.0.5"], "b.o-b_": ["10.77.0.3"]}
    conf = tmp_path / "smb.conf"
    conf.write_text(agent.smb_conf(shares, {"alice": 20000, "b.o-b_": 20001}))
    r = subprocess.run(["testparm", "-s", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0 and "Unknown parameter" not in r.stderr and "Ignoring" not in r.stderr, r.stderr
    assert "[alice]" in r.stdout and "hosts allow = 10.77.0.2 10.77.0.5" in r.stdout
    empty = tmp_path / "empty.conf"
    empty.write_text(agent.smb_conf({}, {}))
    assert subprocess.run(["testparm", "-s", str(empty)], capture_output=True).returncode == 0


def test_exports_give_each_share_to_its_owners_addresses_only() -> None:
    text = agent.exports({"alice": ["10.77.0.2"], "bob": ["10.77.0.3", "10.77.0.4"]}, {"alice": 20000, "bob": 20001})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("/srv/shares/alice 10.77.0.2(") and "anonuid=20000" in lines[0]
    assert "all_squash" in lines[0] and lines[0].count("(") == 1
    assert lines[1].count("(") == 2 and "10.77.0.2" not in lines[1]
