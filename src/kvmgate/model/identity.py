"""VM identity: the design note's "VM ID Structure", made concrete.

A VM is identified by (owner, name, the admin's options in canonical form). The
identity is encoded, URL-safe base64 without padding, into the VM directory's
name; a human-readable symlink names/OWNER/NAME points at that directory.

NAME_MAX: a directory name holds at most 255 bytes. When the encoding is longer,
the directory's name carries the first part (prefix `kg1+` instead of `kg1.`)
and the rest continues as a chain of single-child directories under `id/` inside
it, each name at most 255 bytes. The identity is thus recovered from directory
names alone, never from file contents the owner could write.

The name is part of the identity but never reaches QEMU.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

from kvmgate.errors import IdentityError, UsageError
from kvmgate.model.digest import hexdigest
from kvmgate.model.regex import Regex

MAGIC = "kvmgate-id-1"
SHORT = "kg1."
LONG = "kg1+"
NAME_MAX = 255
CHAIN_DIR = "id"
# The symlink to the VM directory must fit in PATH_MAX; this bounds the identity.
MAX_ENCODED = 3600

# VM names: ASCII lowercase letters, digits, and single '-' or '_' between them.
# No uppercase (dev/Dev), no dots (../), no Unicode look-alikes, no trailing separators.
NAME_RE = Regex(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", re.ASCII)
NAME_MAX_LEN = 32
# Linux user names as sites use them (john.doe included); never "." or "..".
OWNER_RE = Regex(r"[a-z_][a-z0-9_.-]{0,31}", re.ASCII)
_B64 = Regex(r"[A-Za-z0-9_-]+", re.ASCII)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX_LEN or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid VM name {name[:40]!r}: use 1-{NAME_MAX_LEN} of a-z, 0-9, starting with a letter,"
            " with single '-' or '_' between"
        )
    return name


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_RE.fullmatch(owner):
        raise UsageError(f"invalid user name {owner[:40]!r}")
    return owner


class Identity(NamedTuple):
    owner: str
    name: str
    tokens: tuple[str, ...]  # the admin's options, canonical, in the note's vocabulary

    def canonical(self) -> bytes:
        parts = [MAGIC, self.owner, self.name, *self.tokens]
        if any("\0" in p for p in parts):
            raise IdentityError("identity parts must not contain NUL")
        return "\0".join(parts).encode("utf-8")

    @property
    def key(self) -> str:
        """Fixed-length handle for runtime paths and cgroups (identity names are long)."""
        return hexdigest(self.canonical())[:24]

    def components(self) -> list[str]:
        """[directory name, chain...]: every element at most NAME_MAX bytes."""
        enc = base64.urlsafe_b64encode(self.canonical()).decode("ascii").rstrip("=")
        if len(enc) > MAX_ENCODED:
            raise UsageError(f"the VM's options are too long to encode ({len(enc)} > {MAX_ENCODED} characters)")
        if len(SHORT) + len(enc) <= NAME_MAX:
            return [SHORT + enc]
        head = NAME_MAX - len(LONG)
        rest = enc[head:]
        return [LONG + enc[:head]] + [rest[i : i + NAME_MAX] for i in range(0, len(rest), NAME_MAX)]


def decode(components: list[str]) -> Identity:
    """Inverse of `Identity.components`; anything malformed raises IdentityError."""
    if not components:
        raise IdentityError("empty identity")
    first, chain = components[0], components[1:]
    if first.startswith(SHORT):
        if chain:
            raise IdentityError("short identity with a continuation chain")
        enc = first[len(SHORT) :]
    elif first.startswith(LONG):
        if not chain or len(first) != NAME_MAX or any(len(c) != NAME_MAX for c in chain[:-1]):
            raise IdentityError("malformed long identity")
        enc = first[len(LONG) :] + "".join(chain)
    else:
        raise IdentityError("not a kvmgate identity")
    if not _B64.fullmatch(enc) or any(len(c) > NAME_MAX for c in components):
        raise IdentityError("identity is not URL-safe base64")
    try:
        raw = base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4))
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError) as err:
        raise IdentityError("identity does not decode") from err
    parts = text.split("\0")
    if len(parts) < 3 or parts[0] != MAGIC:
        raise IdentityError("identity has no kvmgate header")
    ident = Identity(parts[1], parts[2], tuple(parts[3:]))
    try:
        check_owner(ident.owner)
        check_name(ident.name)
    except UsageError as err:
        raise IdentityError(f"identity holds an {err}") from err
    if ident.components() != components:
        raise IdentityError("identity is not in canonical form")
    return ident
