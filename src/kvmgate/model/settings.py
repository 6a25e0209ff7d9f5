"""A VM's settings: what the admin fixed that is not a QEMU option. Pure.
(NamedTuples, not dataclasses: see model/commands.py on start-up cost.)

`settings.json` in the VM directory (root-only) is parsed here once, strictly,
into typed records; everything else uses the records. Its values reach `ip
-batch`, the nftables ruleset and dnsmasq, so each has a strict shape: even a
damaged file can never smuggle a command or a rule into them.

The file is versioned. Version 0 is the unversioned dict written before the
field existed; it is read as version 1 with the same meaning (`migrate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from kvmgate.errors import KvmgateError, UsageError
from kvmgate.model.regex import Regex

VERSION = 4  # 2: image, image_id, cloud_init, guest_agent (absent in 1: no image, no seed, no agent)
# 3: on_pressure, template, template_digest, user_options (absent in 2: refuse, made by the admin, the policy's list)
# 4: owner_map (absent in 3: off)
ON_LOGOFF = ("none", "pause", "hibernate")
ON_PRESSURE = ("refuse", "hibernate")
MAX_BYTES = 1 << 20


class Forward(NamedTuple):
    """A host port from the pool forwarded to a guest TCP port. With wake on
    connect, kvmgate-gated listens on `port` and QEMU on the loopback `internal`."""

    service: str
    guest: int
    port: int
    internal: int | None = None


class Nic(NamedTuple):
    """A NIC on a network the admin named. `tap` is None on QEMU's user network;
    `ip` is None where kvmgate gives no address (user and private networks)."""

    network: str
    mac: str
    tap: str | None = None
    ip: str | None = None


class Settings(NamedTuple):
    on_logoff: str = "none"
    service: bool = False
    autostart: bool = False
    wake: bool = False  # kvmgate-gated owns the forwarded ports and wakes the VM on a connection
    idle: int = 0  # seconds without connections before gated freezes it (0: never)
    forwards: tuple[Forward, ...] = ()
    nics: tuple[Nic, ...] = ()
    logoff_delay: int | None = None  # seconds; None: the policy's logoff_delay_seconds
    image: str | None = None  # the library image its default disk is an overlay of (admin create --image)
    image_id: str | None = None  # that image's id: the overlay's header names exactly this one
    cloud_init: bool = False  # each start attaches a NoCloud seed (hostname, the owner's keys, networks)
    guest_agent: bool = False  # a guest agent channel: the helper sets the guest's clock after thaw and restore
    on_pressure: str = "refuse"  # under a running-memory budget: may kvmgate hibernate it to make room?
    template: str | None = None  # the template a user made it from (None: the admin made it)
    template_digest: str | None = None  # that template as it was then: a later edit shows as drift
    user_options: tuple[str, ...] | None = None  # the user options its starts take (None: the policy's user list)
    owner_map: bool = False  # a service VM that reads the owner map (model.ownermap, docs/services.md)

    def with_(self, **changes: Any) -> Settings:
        return self._replace(**changes)

    def to_json(self) -> str:
        data: dict[str, Any] = self._asdict()
        data["forwards"] = [f._asdict() for f in self.forwards]
        data["nics"] = [n._asdict() for n in self.nics]
        data["user_options"] = None if self.user_options is None else list(self.user_options)
        data["version"] = VERSION
        return json.dumps(data, sort_keys=True)


class CorruptSettings(KvmgateError):
    """settings.json does not parse or does not have the expected shapes."""


def _port(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def _match(pattern: str) -> Callable[[object], bool]:
    rx = Regex(pattern)  # compiled on first use: most helper runs never read a NIC

    def check(v: object) -> bool:
        return isinstance(v, str) and rx.fullmatch(v) is not None

    return check


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or check(v)


_IMAGE = _match(r"[a-z][a-z0-9_-]{0,31}")
_IMAGE_ID = _match(r"[0-9a-f]{32}")
_DIGEST = _match(r"[0-9a-f]{16}")
_OPTION = _match(r"-[a-z][a-z0-9-]{0,31}")
IFNAME = _match(r"[a-z][a-z0-9]{0,14}")
NIC_SHAPE: dict[str, Callable[[object], bool]] = {
    "network": _match(r"[a-z][a-z0-9]{0,15}"),
    "mac": _match(r"52:54:00(:[0-9a-f]{2}){3}"),
    "tap": _optional(IFNAME),
    "ip": _optional(_match(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")),
}
FORWARD_SHAPE: dict[str, Callable[[object], bool]] = {
    "service": _match(r"[a-z][a-z0-9-]{0,15}"),
    "guest": _port,
    "port": _port,
    "internal": _optional(_port),
}


def _rows(rows: object, shape: dict[str, Callable[[object], bool]]) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise CorruptSettings("a list of rows expected")
    for r in rows:
        if not isinstance(r, dict) or set(r) != set(shape) or not all(check(r[k]) for k, check in shape.items()):
            raise CorruptSettings("a row of the wrong shape")
    return rows


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older file's dict to the current version."""
    version = data.pop("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= VERSION:
        raise CorruptSettings(f"unknown settings version {version!r}")
    return data  # 0 and 1 had a subset of the fields (0 without "version"): their defaults apply


def parse(text: bytes | str) -> Settings:
    """Strictly parse settings.json's content; raises CorruptSettings."""
    if len(text) > MAX_BYTES:
        raise CorruptSettings("settings file too large")
    try:
        data = json.loads(text)
    except ValueError:
        raise CorruptSettings("settings file is not JSON") from None
    if not isinstance(data, dict):
        raise CorruptSettings("settings file is not an object")
    data = migrate(data)
    known = set(Settings._fields)
    if set(data) - known:
        raise CorruptSettings("unknown settings")
    s = Settings()
    on_logoff = data.get("on_logoff", s.on_logoff)
    if on_logoff not in ON_LOGOFF:
        raise CorruptSettings("bad on_logoff")
    flags = {k: data.get(k, getattr(s, k)) for k in ("service", "autostart", "wake", "owner_map")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise CorruptSettings("bad flag")
    idle = data.get("idle", 0)
    if not isinstance(idle, int) or isinstance(idle, bool) or not 0 <= idle <= MAX_IDLE:
        raise CorruptSettings("bad idle")
    forwards = tuple(Forward(**r) for r in _rows(data.get("forwards", []), FORWARD_SHAPE))
    nics = tuple(Nic(**r) for r in _rows(data.get("nics", []), NIC_SHAPE))
    delay = data.get("logoff_delay")
    if delay is not None and (not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_IDLE):
        raise CorruptSettings("bad logoff_delay")
    image, image_id = data.get("image"), data.get("image_id")
    if (image is None) != (image_id is None) or not (
        image is None or (_IMAGE(image) and isinstance(image_id, str) and _IMAGE_ID(image_id))
    ):
        raise CorruptSettings("bad image")
    cloud_init, agent = data.get("cloud_init", False), data.get("guest_agent", False)
    if not isinstance(cloud_init, bool) or not isinstance(agent, bool):
        raise CorruptSettings("bad cloud_init or guest_agent")
    pressure = data.get("on_pressure", "refuse")
    if pressure not in ON_PRESSURE:
        raise CorruptSettings("bad on_pressure")
    template, digest = data.get("template"), data.get("template_digest")
    if (template is None) != (digest is None) or not (
        template is None or (_IMAGE(template) and isinstance(digest, str) and _DIGEST(digest))
    ):
        raise CorruptSettings("bad template")
    user = data.get("user_options")
    if user is not None and (
        not isinstance(user, list) or len(user) > 64 or not all(isinstance(u, str) and _OPTION(u) for u in user)
    ):
        raise CorruptSettings("bad user_options")
    return Settings(
        on_logoff, flags["service"], flags["autostart"], flags["wake"], idle, forwards, nics, delay,
        image, image_id, cloud_init, agent, pressure, template, digest, None if user is None else tuple(user),
        flags["owner_map"],
    )  # fmt: skip


MAX_IDLE = 7 * 86400


def check_on_logoff(mode: str) -> str:
    if mode not in ON_LOGOFF:
        raise UsageError("--on-logoff must be none, pause or hibernate")
    return mode


def parse_seconds(raw: str, flag: str, zero: str = "", limit: int = MAX_IDLE) -> int:
    """Whole seconds for `flag`, ASCII digits only (str.isdigit accepts other
    scripts' digits and superscripts)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 7 or int(raw) > limit:
        raise UsageError(f"{flag} takes seconds between 0 and {limit}" + (f" (0: {zero})" if zero else ""))
    return int(raw)


def parse_idle(raw: str) -> int:
    return parse_seconds(raw, "--idle", "never")
