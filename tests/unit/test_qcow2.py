"""qcow2 header checks (refuse backing and data files) and the empty-image writer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.model import qcow2


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize("size", [1 << 20, 64 << 20, 10 << 30, (1 << 40) + 512])
def test_empty_image_is_valid_for_qemu_img(tmp_path: Path, size: int) -> None:
    p = tmp_path / "e.qcow2"
    image = qcow2.empty_image(size)
    p.write_bytes(image.head)
    os.truncate(p, image.length)
    assert len(image.head) <= 3 << 16, "the head is three clusters, whatever the size"
    qemu_img("check", str(p))
    info = subprocess.run(["qemu-img", "info", "--output=json", str(p)], capture_output=True, text=True, check=True)
    assert f'"virtual-size": {size}' in info.stdout
    assert qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ]).virtual_size == size


def test_qemu_img_made_image_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    assert qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ]).virtual_size == 1 << 30


def test_backing_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "backing_file=/etc/shadow,backing_fmt=raw", "-u", str(p), "1G")
    with pytest.raises(qcow2.Qcow2Refused, match="backing file"):
        qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ])


def test_json_backing_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "j.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-u",
        "-o",
        'backing_file=json:{"file":{"driver":"file",,"filename":"/etc/shadow"}},backing_fmt=raw',
        str(p),
        "1G",
    )
    with pytest.raises(qcow2.Qcow2Refused, match="backing file"):
        qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ])


def test_data_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path}/data.raw", str(p), "1G")
    with pytest.raises(qcow2.Qcow2Refused, match="data file"):
        qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ])


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_inspect_never_crashes(data: bytes) -> None:
    with contextlib.suppress(qcow2.Qcow2Refused):
        qcow2.inspect(qcow2.MAGIC + data)


BACKING = "kvmgate-image:" + "0" * 32


def test_an_overlay_names_its_backing_image_and_qemu_img_reads_it(tmp_path: Path) -> None:
    p = tmp_path / "o.qcow2"
    image = qcow2.empty_image(64 << 20, backing=BACKING)
    p.write_bytes(image.head)
    os.truncate(p, image.length)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(p)], capture_output=True, text=True, check=True
    ).stdout
    assert f'"backing-filename": "{BACKING}"' in info and '"backing-filename-format": "qcow2"' in info
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(p)}})
    qemu_img("check", f"json:{spec}")
    head = p.read_bytes()[: qcow2.HEADER_READ]
    assert qcow2.inspect(head, BACKING).backing == BACKING
    with pytest.raises(qcow2.Qcow2Refused, match="backing file"):
        qcow2.inspect(head)  # a disk of a user's own: no backing file at all
    with pytest.raises(qcow2.Qcow2Refused, match="not this VM's library image"):
        qcow2.inspect(head, "kvmgate-image:" + "1" * 32)


def test_an_overlay_rebased_by_its_owner_is_refused(tmp_path: Path) -> None:
    """The owner may rewrite their overlay's header (qemu-img rebase -u): the name
    is compared, never followed, so any other name is a refusal."""
    p = tmp_path / "o.qcow2"
    image = qcow2.empty_image(64 << 20, backing=BACKING)
    p.write_bytes(image.head)
    os.truncate(p, image.length)
    qemu_img("rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(p))
    with pytest.raises(qcow2.Qcow2Refused, match="not this VM's library image"):
        qcow2.inspect(p.read_bytes()[: qcow2.HEADER_READ], BACKING)
    standalone = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(standalone), "64M")
    with pytest.raises(qcow2.Qcow2Refused, match="not an overlay"):
        qcow2.inspect(standalone.read_bytes()[: qcow2.HEADER_READ], BACKING)
