"""Image files coming in, and the admin's image library's records. Pure.

There is one import path (`host.imports`), shared by `admin image add` (the
library) and `admin import` (a VM's own disk). Its rules live here:
- A file's format comes from its name plus a header check, never from probing
  its content alone: `.qcow2` is qcow2, `.raw` (and `.iso`) is raw, and a name
  that says nothing (`.img`, `.bin`, no suffix: real cloud images ship as
  qcow2 under `.img`) needs the admin's `--format`. A header that disagrees is
  refused, naming what the header says it is.
- Library images are stored as qcow2, root-owned and read-only; a VM made from
  one gets a qcow2 overlay whose header names `backing_name(id)`: a name no
  tool can open, only ever compared, never followed.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from kvmgate.errors import FileRefused, KvmgateError, Qcow2Refused, UsageError
from kvmgate.model import qcow2
from kvmgate.model.regex import Regex

FORMATS = ("qcow2", "raw")
_BY_SUFFIX = {".qcow2": "qcow2", ".raw": "raw", ".iso": "raw"}
_SILENT = (".img", ".bin", ".disk", ".image")  # names that say nothing about the format

# Other formats' signatures at offset 0: refused outright (convert them with qemu-img
# first), and never passed on as raw data.
_FOREIGN = (
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"<<< ", "vdi"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"),
)


def format_for(path: str, given: str | None) -> str:
    """The format of the file `path` names: `--format` if given, else its name."""
    if given is not None:
        if given not in FORMATS:
            raise UsageError("--format takes qcow2 or raw")
        return given
    base = path.rsplit("/", 1)[-1].lower()
    suffix = "." + base.rsplit(".", 1)[-1] if "." in base.lstrip(".") else ""
    fmt = _BY_SUFFIX.get(suffix)
    if fmt is None:
        said = f"its name ({suffix})" if suffix in _SILENT else ("its name" if not suffix else f"{suffix!r}")
        raise UsageError(f"{said} does not say whether {base[:60]} is qcow2 or raw: give --format qcow2|raw")
    return fmt


def header_says(head: bytes) -> str | None:
    """What a file's first bytes say it is, for the refusal's hint."""
    if qcow2.is_qcow2(head):
        return "qcow2"
    return next((name for magic, name in _FOREIGN if head.startswith(magic)), None)


def check_header(head: bytes, fmt: str, file_size: int, what: str) -> int:
    """The virtual size of an image of format `fmt` whose file starts with
    `head`, or a refusal: a header that disagrees with the format, a qcow2 with
    a backing file, an external data file or encryption."""
    said = header_says(head)
    if fmt == "qcow2":
        if said != "qcow2":
            raise FileRefused(f"{what}: not a qcow2 image" + (f" (its header says {said})" if said else ""))
        try:
            return qcow2.inspect(head).virtual_size
        except Qcow2Refused as err:
            raise FileRefused(f"{what}: {err}{qcow2.hint(err)}") from None
    if said is not None:
        raise FileRefused(
            f"{what}: its header says {said}, not raw" + (": give --format qcow2" if said == "qcow2" else "")
        )
    if file_size <= 0:
        raise FileRefused(f"{what}: the file is empty")
    return -(-file_size // 512) * 512


def refuse_above(size: int, max_gib: int, what: str) -> None:
    """A virtual size (from a header or a file's length) above the host's limit."""
    if size > max_gib << 30:
        raise FileRefused(
            f"{what}: its virtual size ({f'{size / (1 << 30):.1f}'.removesuffix('.0')} GiB) is above this host's limit "
            f"of {max_gib} GiB (limits.image_max_gib)"
        )


def backing_name(image_id: str) -> str:
    """What a library overlay's header names as its backing file. It has a
    protocol prefix QEMU does not know, so no tool that follows it opens a file."""
    return f"kvmgate-image:{image_id}"


ID = Regex(r"[0-9a-f]{32}", re.ASCII)
VERSION = 1
_RECORD_KEYS = {"version", "name", "id", "format", "virtual_size", "added", "source", "cloud_init"}


class Record(NamedTuple):
    """STATE/images/NAME.json: one library image. The data is STATE/images/ID.qcow2."""

    name: str
    id: str
    virtual_size: int
    added: str  # UTC, ISO 8601
    source: str  # where the admin took it from (shown to the admin only)
    cloud_init: bool = False  # VMs made from it get a NoCloud seed at every start
    format: str = "qcow2"

    @property
    def data(self) -> str:
        return f"{self.id}.qcow2"

    def to_json(self) -> str:
        return json.dumps({**self._asdict(), "version": VERSION}, sort_keys=True)


def parse_record(text: bytes) -> Record:
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise KvmgateError("image record is not JSON") from None
    if not isinstance(data, dict) or set(data) != _RECORD_KEYS or data["version"] != VERSION:
        raise KvmgateError("image record of an unknown shape or version")
    ok = (
        isinstance(data["name"], str)
        and isinstance(data["id"], str)
        and ID.fullmatch(data["id"]) is not None
        and data["format"] == "qcow2"
        and isinstance(data["virtual_size"], int)
        and not isinstance(data["virtual_size"], bool)
        and data["virtual_size"] > 0
        and isinstance(data["added"], str)
        and isinstance(data["source"], str)
        and isinstance(data["cloud_init"], bool)
    )
    if not ok:
        raise KvmgateError("image record with a bad field")
    data.pop("version")
    return Record(**data)


_PROGRESS = re.compile(rb"\((\d{1,3})\.\d+/100%\)")


def progress(chunk: bytes) -> int | None:
    """The last whole percentage in a piece of `qemu-img convert -p` output."""
    found = _PROGRESS.findall(chunk)
    return min(100, int(found[-1])) if found else None
