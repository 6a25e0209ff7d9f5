"""Templates, grants, quotas and the budget's choice: pure, property-tested."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.errors import PolicyError, UsageError
from kvmgate.model import selfservice as ss
from kvmgate.model.policy.policy import Policy

names = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
maybe_mib = st.none() | st.integers(0, 1 << 20)
grants = st.builds(
    ss.Grant,
    st.frozensets(names, max_size=4),
    st.integers(0, 50),
    maybe_mib,
    maybe_mib,
    st.none() | st.integers(0, 1 << 40).map(lambda n: n & ~511),
    st.none() | st.integers(0, 100),
)
uses = st.builds(ss.Use, *(st.integers(0, 1 << 40) for _ in range(6)))


def test_a_template_needs_a_disk_and_knows_its_keys() -> None:
    with pytest.raises(PolicyError, match="image or a disk_size"):
        ss.parse_template("t", {"options": ["-m", "64"]})
    with pytest.raises(PolicyError, match="unknown key"):
        ss.parse_template("t", {"disk_size": "1G", "memory": "1G"})
    with pytest.raises(PolicyError, match="below disk_size"):
        ss.parse_template("t", {"disk_size": "2G", "max_disk_size": "1G"})
    with pytest.raises(UsageError):
        ss.parse_template("T", {"disk_size": "1G"})  # the VM-name grammar
    with pytest.raises(UsageError):
        ss.parse_template("t", {"disk_size": "\uff11G"})


def test_a_template_is_validated_against_the_policy() -> None:
    from kvmgate.store.selfservice import validate_template

    policy = Policy()
    ok = validate_template(policy, ss.parse_template("t", {"disk_size": "1G", "options": ["-m", "1G"]}))
    assert ok.options == ("-m", "1024")  # canonical, as the identity stores them
    for bad, why in (
        ({"options": ["-monitor", "stdio"]}, "monitor"),
        ({"networks": ["nosuch"]}, "no network"),
        ({"user_options": ["-m"]}, "user list"),
        ({"forwards": ["ssh@20001"]}, "@PORT"),
        ({"image": "img", "options": ["-hda", "/x.img"]}, "-hda"),
    ):
        with pytest.raises((PolicyError, UsageError), match=why):
            validate_template(policy, ss.parse_template("t", {"disk_size": "1G", **bad}))


@given(
    st.builds(
        ss.Template,
        names,
        st.just(("-m", "256")),
        st.none() | names,
        st.integers(1, 1 << 20).map(lambda n: n << 20),
        st.none(),
        st.lists(st.sampled_from(["user", "private"]), max_size=2, unique=True).map(tuple),
        st.none() | st.just("ssh,http"),
        st.sampled_from(["none", "pause", "hibernate"]),
        st.none() | st.integers(0, 86400),
        st.sampled_from(ss.ON_PRESSURE),
        st.none() | st.just(("-cdrom", "-boot")),
        st.none() | st.booleans(),
        st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40).filter(str.isprintable),
    )
)
def test_a_template_written_as_toml_reads_back_the_same(t: ss.Template) -> None:
    back = ss.parse_template(t.name, tomllib.loads(ss.template_text(t)))
    assert back == t and back.digest() == t.digest()


@given(st.dictionaries(names, grants, max_size=3), st.dictionaries(names, grants, max_size=3))
def test_grants_written_as_toml_read_back_the_same(users: dict[str, ss.Grant], groups: dict[str, ss.Grant]) -> None:
    back = ss.parse_grants(tomllib.loads(ss.grants_text(ss.Grants(users, groups))))
    norm = {k: g._replace(memory_mib=g.memory_mib, running_memory_mib=g.running_memory_mib) for k, g in users.items()}
    assert dict(back.users) == norm and dict(back.groups) == groups


@given(st.lists(grants, min_size=1, max_size=4))
def test_the_most_generous_grant_applies_limit_by_limit(found: list[ss.Grant]) -> None:
    m = ss.merge_grants(found)
    assert m is not None
    assert m.templates == frozenset().union(*(g.templates for g in found))
    assert m.vms == max(g.vms for g in found)
    for field in ("memory_mib", "running_memory_mib", "disk_bytes", "ports"):
        values = [getattr(g, field) for g in found]
        got = getattr(m, field)
        assert got is None if None in values else got == max(values)


def test_a_users_grant_and_their_groups_grants_merge() -> None:
    g = ss.Grants({"alice": ss.Grant(frozenset({"a"}), 1, 100)}, {"lab": ss.Grant(frozenset({"b"}), 3, 50)})
    assert ss.grant_for(g, "alice", ["lab"]) == ss.Grant(frozenset({"a", "b"}), 3, 100)
    assert ss.grant_for(g, "bob", ["users"]) is None
    assert ss.grant_for(g, "bob", ["lab"]) == g.groups["lab"]


@given(uses, uses, grants)
def test_a_request_fits_exactly_when_no_limit_is_passed(use: ss.Use, want: ss.Use, grant: ss.Grant) -> None:
    refusal = ss.over(use, want, grant)
    limits = (
        (grant.vms, use.vms, want.vms),
        (grant.memory_mib, use.memory_mib, want.memory_mib),
        (grant.disk_bytes, use.disk_virtual, want.disk_virtual),
        (grant.disk_bytes, use.disk_real, want.disk_real),
        (grant.ports, use.ports, want.ports),
    )
    passes = any(lim is not None and asked > 0 and used + asked > lim for lim, used, asked in limits)
    assert (refusal is not None) == passes
    if refusal:
        assert refusal.startswith("over your ") and "you use" in refusal and "this asks for" in refusal


running = st.builds(
    ss.Running,
    names,
    names,
    st.integers(1, 4096),
    st.floats(0, 1e9),
    st.booleans(),
    st.booleans(),
)


@given(
    st.lists(running, max_size=8, unique_by=lambda r: (r.owner, r.name)), st.integers(1, 4096), st.integers(0, 1 << 14)
)
def test_the_budget_hibernates_the_fewest_least_recently_used_vms_that_may_go(
    vms: list[ss.Running], need: int, budget: int
) -> None:
    chosen = ss.victims(vms, need, budget)
    total = sum(r.memory_mib for r in vms)
    may = sorted((r for r in vms if r.may_hibernate), key=lambda r: (r.owner_present, r.used, r.owner, r.name))
    if chosen is None:
        assert total - sum(r.memory_mib for r in may) + need > budget  # even all of them would not do
        return
    assert all(r.may_hibernate for r in chosen)
    assert chosen == may[: len(chosen)]  # least recently used first, owners who are away first
    assert total - sum(r.memory_mib for r in chosen) + need <= budget
    if chosen:  # and no fewer would do
        assert total - sum(r.memory_mib for r in chosen[:-1]) + need > budget


def test_the_line_of_a_key_or_table() -> None:
    text = "# grants\n\n[user.alice]\ntemplates = []\n\n[user.x]\nvms = 'many'\n"
    assert ss.line_of(text, "user.x") == 6
    assert ss.line_of(text, "vms") == 7
    assert ss.line_of(text, "nothing") == 1


def test_a_template_may_narrow_the_user_options() -> None:
    p = Policy()
    assert [o.name for o in p.parse(["-snapshot"], "user", ("-snapshot",))] == ["-snapshot"]
    with pytest.raises(PolicyError, match="template does not let you"):
        p.parse(["-cdrom", "/x.iso"], "user", ("-snapshot",))
    with pytest.raises(PolicyError, match="template does not let you"):
        p.parse(["-snapshot"], "user", ())


@pytest.mark.parametrize(
    ("raw", "ok"),
    [("512M", True), ("10G", True), ("1T", True), ("1", False), ("10g", False), ("1.5G", False), ("", False)],
)
def test_sizes(raw: str, ok: bool) -> None:
    if ok:
        assert ss.parse_size(raw) > 0
    else:
        with pytest.raises(UsageError):
            ss.parse_size(raw)
