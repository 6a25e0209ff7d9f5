"""settings.json: parsed once, strictly, into typed records; versioned."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.model import settings as s
from kvmgate.model.settings import CorruptSettings, Forward, Nic, Settings

ports = st.integers(1, 65535)
forwards = st.builds(
    Forward,
    service=st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
    guest=ports,
    port=ports,
    internal=st.none() | ports,
)
nics = st.builds(
    Nic,
    network=st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True),
    mac=st.from_regex(r"52:54:00(:[0-9a-f]{2}){3}", fullmatch=True),
    tap=st.none() | st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True),
    ip=st.none() | st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", fullmatch=True),
)
every = st.builds(
    Settings,
    on_logoff=st.sampled_from(s.ON_LOGOFF),
    service=st.booleans(),
    autostart=st.booleans(),
    wake=st.booleans(),
    idle=st.integers(0, s.MAX_IDLE),
    forwards=st.lists(forwards, max_size=4).map(tuple),
    nics=st.lists(nics, max_size=4).map(tuple),
    logoff_delay=st.none() | st.integers(0, s.MAX_IDLE),
    cloud_init=st.booleans(),
    guest_agent=st.booleans(),
    image=st.none(),
    image_id=st.none(),
    on_pressure=st.sampled_from(s.ON_PRESSURE),
    template=st.none(),
    template_digest=st.none(),
    user_options=st.none() | st.lists(st.sampled_from(["-cdrom", "-boot", "-snapshot", "-smp"]), max_size=4).map(tuple),
    owner_map=st.booleans(),
).flatmap(
    lambda base: st.one_of(
        st.just(base),
        st.builds(
            lambda name, image_id: base.with_(image=name, image_id=image_id),
            st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
            st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        ),
        st.builds(
            lambda name, digest: base.with_(template=name, template_digest=digest),
            st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
            st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
        ),
    )
)


@given(every)
def test_what_is_written_reads_back_the_same(settings: Settings) -> None:
    text = settings.to_json()
    assert json.loads(text)["version"] == s.VERSION
    assert s.parse(text) == settings


VALID = {
    "on_logoff": "pause",
    "service": False,
    "autostart": False,
    "wake": True,
    "idle": 60,
    "forwards": [{"service": "ssh", "guest": 22, "port": 20000, "internal": 40000}],
    "nics": [{"network": "services", "mac": "52:54:00:aa:bb:cc", "tap": "kgt0", "ip": "10.77.0.2"}],
}


def test_a_version_0_file_reads_as_the_same_settings() -> None:
    """Files written before the version field (the previous release) stay valid."""
    old = s.parse(json.dumps(VALID))
    assert old == s.parse(json.dumps({**VALID, "version": 1}))
    assert old.forwards == (Forward("ssh", 22, 20000, 40000),) and old.nics[0].tap == "kgt0"


@pytest.mark.parametrize(
    "change",
    [
        {"version": 5},
        {"version": "1"},
        {"owner_map": 1},
        {"image": "deb", "image_id": None},
        {"image": "deb", "image_id": "../../x"},
        {"image": "../x", "image_id": "0" * 32},
        {"cloud_init": 1},
        {"on_logoff": "sleep"},
        {"service": 1},
        {"idle": -1},
        {"idle": True},
        {"logoff_delay": -1},
        {"logoff_delay": "60"},
        {"logoff_delay": False},
        {"extra": 1},
        {"forwards": [{"service": "ssh", "guest": 22, "port": 0, "internal": None}]},
        {"forwards": [{"service": "ssh", "guest": 22, "port": 20000}]},
        {"forwards": [{"service": "ssh;x", "guest": 22, "port": 20000, "internal": None}]},
        {"nics": [{"network": "services", "mac": "52:54:00:aa:bb:cc", "tap": "kgt0\nx", "ip": None}]},
        {"nics": [{"network": "services", "mac": "02:00:00:aa:bb:cc", "tap": None, "ip": None}]},
        {"nics": [{"network": "s", "mac": "52:54:00:aa:bb:cc", "tap": None, "ip": "10.0.0.1; flush"}]},
        {"nics": {"network": "s"}},
    ],
)
def test_one_bad_field_refuses_the_whole_file(change: dict) -> None:
    """Values reach ip -batch, nft and dnsmasq: a damaged file must never pass."""
    with pytest.raises(CorruptSettings):
        s.parse(json.dumps({**VALID, **change}))


@pytest.mark.parametrize("text", ["", "[]", "null", "{", "x" * (s.MAX_BYTES + 1)])
def test_not_an_object_is_refused(text: str) -> None:
    with pytest.raises(CorruptSettings):
        s.parse(text)


@pytest.mark.parametrize("raw", ["60", "0", str(s.MAX_IDLE)])
def test_idle_takes_ascii_seconds(raw: str) -> None:
    assert s.parse_idle(raw) == int(raw)


@pytest.mark.parametrize("raw", ["", "-1", "\u00b2", "\u0661", "1e3", str(s.MAX_IDLE + 1), "9" * 30])
def test_idle_refuses_everything_else(raw: str) -> None:
    with pytest.raises(s.UsageError):
        s.parse_idle(raw)


def test_the_logoff_delay_defaults_to_the_policys_60_seconds() -> None:
    from kvmgate.model.policy.policy import Policy

    assert s.parse(json.dumps(VALID)).logoff_delay is None, "a VM from before the delay takes the policy's"
    assert Policy().logoff_delay_seconds == 60
    assert Policy.from_dict({"logoff_delay_seconds": 0}).logoff_delay_seconds == 0
