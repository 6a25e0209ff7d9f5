"""The cloud-init NoCloud seed: what goes in, from what. Pure.

The seed holds the VM's name (its hostname), an instance id stable per VM,
the owner's ssh public keys and the NICs' MAC addresses (DHCP on each). The
keys come from the owner's `~/.ssh/authorized_keys` and `~/.ssh/*.pub`, read
with the owner's rights by `host.keys`; here only well-formed public key lines
survive, each checked down to its base64 blob, so nothing else from a home
directory can ever reach a guest. A line with options (`command=`, `from=`)
is not copied: the guest could not honour the restriction, and dropping it
would widen what the key may do. Anything that is not a key, a comment or a
blank line is refused, naming the file and line.

user-data is `#cloud-config` followed by JSON (JSON is YAML), so no value is
ever interpreted by a YAML parser's implicit typing.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import NamedTuple

from kvmgate.errors import FileRefused
from kvmgate.model import iso9660

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
MAX_KEYS = 64
MAX_BLOB = 16384  # base64 characters: an RSA-16384 key fits
LABEL = "cidata"


class Key(NamedTuple):
    type: str
    blob: str  # base64, checked
    comment: str
    source: str  # "~/.ssh/authorized_keys:3"

    @property
    def line(self) -> str:
        return f"{self.type} {self.blob}" + (f" {self.comment}" if self.comment else "")

    @property
    def fingerprint(self) -> str:
        from kvmgate.model.digest import sha256

        raw = sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(raw).decode().rstrip("=")


class Skipped(NamedTuple):
    source: str
    reason: str


def _key(words: list[str], source: str) -> Key | None:
    if len(words) < 2 or words[0] not in KEY_TYPES:
        return None
    ktype, blob = words[0], words[1]
    if len(blob) > MAX_BLOB:
        return None
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    # The blob starts with its own type, as an SSH string: a pasted blob of another key type is not this key.
    if len(raw) < 4:
        return None
    (n,) = struct.unpack_from(">I", raw)
    if raw[4 : 4 + n] != ktype.encode():
        return None
    comment = " ".join(words[2:])
    if not (comment.isascii() and comment.isprintable()) or len(comment) > 200:
        comment = ""
    return Key(ktype, blob, comment, source)


def parse_keys(text: bytes, source: str) -> tuple[list[Key], list[Skipped]]:
    """The keys in one file (authorized_keys or a .pub), or a refusal."""
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FileRefused(f"{source}: not text") from None
    keys: list[Key] = []
    skipped: list[Skipped] = []
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{i}"
        words = stripped.split()
        key = _key(words, where)
        if key is not None:
            keys.append(key)
            continue
        # An authorized_keys line with options: options, then a well-formed key.
        if any(_key(words[j:], where) for j in range(1, min(len(words), 8))):
            skipped.append(Skipped(where, "has options (command=, from=, ...): not copied into the guest"))
            continue
        raise FileRefused(f"{where}: not an ssh public key line")
    return keys, skipped


def unique(keys: list[Key]) -> list[Key]:
    seen: set[tuple[str, str]] = set()
    out = []
    for k in keys:
        if (k.type, k.blob) not in seen:
            seen.add((k.type, k.blob))
            out.append(k)
    if len(out) > MAX_KEYS:
        raise FileRefused(f"more than {MAX_KEYS} ssh keys in ~/.ssh")
    return out


def record(keys: list[Key], skipped: list[Skipped]) -> dict[str, list[dict[str, str]]]:
    """What `kvmgate keys` shows: fingerprints and where each key came from."""
    return {
        "keys": [{"type": k.type, "fingerprint": k.fingerprint, "comment": k.comment, "from": k.source} for k in keys],
        "skipped": [s._asdict() for s in skipped],
    }


def files(hostname: str, instance_id: str, user: str, keys: list[Key], macs: list[str]) -> dict[str, bytes]:
    """The seed's files. hostname: the VM's name; instance_id: stable per VM (a
    new VM, or a new identity, is a new instance); user: the owner, the guest
    account the keys are installed for (as well as the image's default user)."""
    lines = [k.line for k in keys]
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"
    user_data = {
        "hostname": hostname,
        "ssh_authorized_keys": lines,  # the image's default user (debian, ubuntu, ...)
        "users": [
            "default",
            {
                "name": user,
                "ssh_authorized_keys": lines,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
            },
        ],
    }
    network = {
        "version": 2,
        "ethernets": {f"nic{i}": {"match": {"macaddress": mac}, "dhcp4": True} for i, mac in enumerate(macs)},
    }
    return {
        "meta-data": meta.encode(),
        "user-data": ("#cloud-config\n" + json.dumps(user_data, indent=1, sort_keys=True) + "\n").encode(),
        "network-config": (json.dumps(network, indent=1, sort_keys=True) + "\n").encode(),
    }


def seed_image(text: str, keys: list[Key]) -> bytes:
    """The seed CD from the plan's seed resource (`translate.Seed` and the MACs, as JSON)."""
    spec = json.loads(text)
    return iso9660.image(LABEL, files(spec["hostname"], spec["instance_id"], spec["user"], keys, spec["macs"]))
