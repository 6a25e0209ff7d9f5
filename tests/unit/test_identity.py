"""VM identity: encoding, NAME_MAX chaining, name grammar, tamper detection."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.errors import IdentityError, UsageError
from kvmgate.model import identity as ident

names = st.from_regex(r"[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,5}){0,3}", fullmatch=True)
owners = st.from_regex(r"[a-z_][a-z0-9_.-]{0,31}", fullmatch=True)
tokens = st.lists(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60), max_size=40
)


@given(owners, names, tokens)
def test_round_trip(owner: str, name: str, toks: list[str]) -> None:
    i = ident.Identity(owner, name, tuple(toks))
    try:
        comps = i.components()
    except UsageError:
        return  # too long to encode: refused, never truncated
    assert all(len(c.encode()) <= ident.NAME_MAX for c in comps)
    assert all("/" not in c and c not in (".", "..") for c in comps)
    assert ident.decode(comps) == i


@given(owners, names, names, tokens)
def test_different_names_give_different_directories(owner: str, a: str, b: str, toks: list[str]) -> None:
    if a == b:
        return
    x, y = ident.Identity(owner, a, tuple(toks)), ident.Identity(owner, b, tuple(toks))
    try:
        assert x.components()[0] != y.components()[0]
        assert x.key != y.key
    except UsageError:
        pass


def test_same_inputs_same_directory_and_owner_matters() -> None:
    a = ident.Identity("alice", "dev", ("-m", "256"))
    assert a.components() == ident.Identity("alice", "dev", ("-m", "256")).components()
    assert a.components() != ident.Identity("bob", "dev", ("-m", "256")).components()


def test_long_identity_is_chained_and_recoverable() -> None:
    toks = tuple(
        t for i in range(40) for t in ("-net", f"nic,vlan={i % 16},macaddr=52:54:00:00:00:{i:02x},model=virtio")
    )
    i = ident.Identity("alice", "big", toks)
    comps = i.components()
    assert len(comps) > 1 and comps[0].startswith(ident.LONG)
    assert all(len(c) <= 255 for c in comps)
    assert ident.decode(comps).tokens == toks


def test_too_long_is_refused() -> None:
    with pytest.raises(UsageError, match="too long"):
        ident.Identity("alice", "huge", ("-append", "x" * 4000)).components()


@pytest.mark.parametrize("name", ["a", "dev", "web-1", "a_b", "x" * 15, "x" * 16, "x" * 17, "x" * 32])
def test_good_names(name: str) -> None:
    assert ident.check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 33,
        "x" * 255,
        "x" * 256,
        "Dev",
        "dev ",
        " dev",
        "dev\n",
        "../x",
        "a/b",
        "a..b",
        ".",
        "..",
        "-a",
        "a-",
        "a--b",
        "1a",
        "d\u0435v",
        "dev\u200b",
        "\uff44\uff45\uff56",
        "a.b",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid VM name"):
        ident.check_name(name)


def _enc(raw: bytes) -> str:
    return ident.SHORT + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "comps",
    [
        [],
        ["kg2.abc"],
        ["kg1.!!!"],
        [_enc(b"nonsense")],
        [_enc(b"kvmgate-id-1\0Alice\0dev")],
        [_enc(b"kvmgate-id-1\0alice\0../x")],
        [_enc(b"kvmgate-id-1\0alice\0dev") + "="],
        [_enc(b"kvmgate-id-1\0alice\0dev"), "extra"],
        [ident.LONG + "A" * 251],
        [_enc(b"\xff\xfe")],
    ],
)
def test_tampered_identities_are_refused(comps: list[str]) -> None:
    with pytest.raises(IdentityError):
        ident.decode(comps)


def test_non_canonical_long_form_is_refused() -> None:
    short = ident.Identity("alice", "dev", ("-m", "256")).components()[0]
    enc = short[len(ident.SHORT) :]
    with pytest.raises(IdentityError):
        ident.decode([ident.LONG + enc[:3], enc[3:]])


@pytest.mark.parametrize("owner", ["alice", "john.doe", "_svc", "a-b"])
def test_good_owners(owner: str) -> None:
    assert ident.check_owner(owner) == owner


@pytest.mark.parametrize("owner", ["", ".", "..", "Alice", "a/b", "a b", "-a", "x" * 33, "a\n"])
def test_bad_owners(owner: str) -> None:
    with pytest.raises(UsageError):
        ident.check_owner(owner)
