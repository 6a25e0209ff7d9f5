"""The import rules (format from name plus header), library records, the ISO 9660
writer (checked by isoinfo and blkid) and the cloud-init seed's content."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.errors import FileRefused, UsageError
from kvmgate.model import cloudinit, images, iso9660, qcow2


@pytest.mark.parametrize(
    ("name", "given", "fmt"),
    [("a.qcow2", None, "qcow2"), ("A.QCOW2", None, "qcow2"), ("b.raw", None, "raw"), ("c.iso", None, "raw"),
     ("d.img", "qcow2", "qcow2"), ("e", "raw", "raw"), ("x.qcow2", "raw", "raw")],
)  # fmt: skip
def test_the_format_comes_from_the_name_or_the_admin(name: str, given: str | None, fmt: str) -> None:
    assert images.format_for(f"/srv/{name}", given) == fmt


@pytest.mark.parametrize("name", ["cloud.img", "disk.bin", "noext", ".hidden", "x.vmdk"])
def test_a_name_that_says_nothing_needs_format(name: str) -> None:
    with pytest.raises(UsageError, match="--format"):
        images.format_for(f"/srv/{name}", None)


def test_a_header_that_disagrees_is_refused() -> None:
    q = qcow2.empty_image(1 << 20).head
    assert images.check_header(q, "qcow2", len(q), "f") == 1 << 20
    with pytest.raises(FileRefused, match="header says qcow2, not raw: give --format qcow2"):
        images.check_header(q, "raw", len(q), "f")
    with pytest.raises(FileRefused, match="not a qcow2 image"):
        images.check_header(b"\0" * 4096, "qcow2", 4096, "f")
    with pytest.raises(FileRefused, match="header says vmdk"):
        images.check_header(b"KDMV" + b"\0" * 100, "raw", 4096, "f")
    with pytest.raises(FileRefused, match="empty"):
        images.check_header(b"", "raw", 0, "f")
    assert images.check_header(b"\0" * 10, "raw", 1000, "f") == 1024  # whole sectors


def test_records_round_trip_and_refuse_other_shapes() -> None:
    rec = images.Record("deb", "a" * 32, 2 << 30, "2026-12-01T00:00:00Z", "/srv/deb.qcow2", True)
    assert images.parse_record(rec.to_json().encode()) == rec
    data = json.loads(rec.to_json())
    for key, bad in (("id", "../../etc"), ("version", 9), ("format", "raw"), ("virtual_size", True)):
        with pytest.raises(Exception, match="image record"):
            images.parse_record(json.dumps({**data, key: bad}).encode())


def test_progress_is_read_from_qemu_img_output() -> None:
    assert images.progress(b"    (0.00/100%)\r    (42.19/100%)\r") == 42
    assert images.progress(b"nothing") is None


def test_backing_names_are_no_path_qemu_would_open() -> None:
    assert images.backing_name("ab" * 16).startswith("kvmgate-image:")


# ---------------------------------------------------------------- ISO 9660


def _iso(tmp_path: Path, files: dict[str, bytes], label: str = "cidata") -> Path:
    p = tmp_path / "seed.iso"
    p.write_bytes(iso9660.image(label, files))
    return p


def test_the_seed_iso_is_read_by_isoinfo_and_blkid(tmp_path: Path) -> None:
    files = {"meta-data": b"instance-id: x\n", "user-data": b"#cloud-config\n{}\n", "network-config": b"{}\n"}
    p = _iso(tmp_path, files)
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(p)], capture_output=True, text=True)
    assert label.stdout.strip() == "cidata"
    for name, data in files.items():
        got = subprocess.run(["isoinfo", "-J", "-x", f"/{name}", "-i", str(p)], capture_output=True, check=True)
        assert got.stdout == data
    listing = subprocess.run(["isoinfo", "-J", "-l", "-i", str(p)], capture_output=True, text=True, check=True)
    assert all(n in listing.stdout for n in files)


@settings(max_examples=15, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.0123456789", min_size=1, max_size=20).filter(
            lambda n: n not in (".", "..")
        ),
        st.binary(max_size=5000),
        min_size=1,
        max_size=6,
    )
)
def test_any_small_set_of_files_round_trips(files: dict[str, bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = _iso(Path(d), files)
        for name, data in files.items():
            got = subprocess.run(["isoinfo", "-J", "-x", f"/{name}", "-i", str(p)], capture_output=True, check=True)
            assert got.stdout == data, name


# ---------------------------------------------------------------- keys and the seed


def _key(ktype: str = "ssh-ed25519", payload: bytes = b"\1" * 32) -> str:
    blob = struct.pack(">I", len(ktype)) + ktype.encode() + struct.pack(">I", len(payload)) + payload
    return f"{ktype} {base64.b64encode(blob).decode()}"


def test_only_well_formed_key_lines_survive() -> None:
    text = "\n".join([
        "# comment", "", _key() + " alice@laptop", f'command="/bin/true",no-pty {_key(payload=b"2" * 32)}',
        _key("ssh-rsa", b"\3" * 64),
    ]).encode()  # fmt: skip
    keys, skipped = cloudinit.parse_keys(text, "~/.ssh/authorized_keys")
    assert [k.comment for k in keys] == ["alice@laptop", ""]
    assert [s.source for s in skipped] == ["~/.ssh/authorized_keys:4"]
    assert keys[0].fingerprint.startswith("SHA256:")


@pytest.mark.parametrize(
    "line",
    [
        "hello world",
        "ssh-ed25519 not-base64!!",
        _key().replace("ssh-ed25519", "ssh-rsa", 1),  # a blob of another type
        "ssh-ed25519",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ],
)
def test_garbage_is_refused_with_its_line(line: str) -> None:
    with pytest.raises(FileRefused, match=r"authorized_keys:2: not an ssh public key"):
        cloudinit.parse_keys(f"# ok\n{line}\n".encode(), "~/.ssh/authorized_keys")


def test_a_comment_with_control_characters_is_dropped() -> None:
    keys, _ = cloudinit.parse_keys((_key() + " evil\x1b[2Jcomment").encode(), "k")
    assert keys[0].comment == ""


def test_the_seed_files_are_json_and_name_the_owner() -> None:
    keys, _ = cloudinit.parse_keys(_key().encode(), "k")
    files = cloudinit.files("deb", "kvmgate-abc", "alice", keys, ["52:54:00:00:00:01"])
    assert files["meta-data"] == b"instance-id: kvmgate-abc\nlocal-hostname: deb\n"
    head, body = files["user-data"].split(b"\n", 1)
    assert head == b"#cloud-config"
    ud = json.loads(body)
    assert ud["users"][1]["name"] == "alice" and ud["users"][1]["ssh_authorized_keys"] == [keys[0].line]
    net = json.loads(files["network-config"])
    assert net["ethernets"]["nic0"]["match"]["macaddress"] == "52:54:00:00:00:01"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_key_parsing_never_fails_other_than_by_refusal(data: bytes) -> None:
    try:
        keys, _ = cloudinit.parse_keys(data, "k")
    except FileRefused:
        return
    for k in keys:
        assert k.type in cloudinit.KEY_TYPES and "\n" not in k.line
