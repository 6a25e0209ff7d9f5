"""Self-service: the admin's templates and grants, what a user's VMs use, and
whether a request fits. Pure: the files' parsed contents come in, typed records
and one-line refusals go out (the store reads the files, ops measures use).

The admin decides what a VM may be (a template: the same admin options, disk,
networks and logoff policy as `admin create`); a grant says which templates a
user or a group may instantiate, and how much of the host they may hold. The
most generous grant that matches a user applies, limit by limit: each limit is
the largest among the grants for the user and for their groups, and the
templates are all those any of them names. A limit a grant leaves out does not
bound that resource (the template's own sizes times `vms` still do); `vms`
defaults to 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from kvmgate.errors import PolicyError, UsageError
from kvmgate.model.digest import sha256
from kvmgate.model.identity import check_name
from kvmgate.model.regex import Regex

ON_PRESSURE = ("refuse", "hibernate")
USER_NAME = Regex(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
_SIZE = Regex(r"([0-9]{1,15})([KMGT]?)", re.ASCII)
MAX_COUNT = 10000  # vms and ports in a grant
MAX_TEMPLATES = 256


def parse_size(raw: str, flag: str = "--disk-size", low: int = 1 << 20, high: int = 4 << 40) -> int:
    """Bytes from `512M`, `10G`, `1T` (ASCII digits, at most 15 of them), within
    [low, high] and in whole 512-byte sectors."""
    m = _SIZE.fullmatch(raw) if isinstance(raw, str) else None
    if not m:
        raise UsageError(f"{flag} must be a size such as 512M, 10G or 1T")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]
    if not low <= n <= high or n % 512:
        raise UsageError(f"{flag} must be between {_show(low)} and {_show(high)}, in whole sectors")
    return n


def _show(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def show_mib(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


# ------------------------------------------------------------------------ templates


class Template(NamedTuple):
    name: str
    options: tuple[str, ...]  # admin options, canonical tokens (validated by the policy when loaded)
    image: str | None = None  # a library image: the VM's disk is its overlay
    disk_size: int | None = None  # bytes: an empty disk (or, with an image, the overlay's size if larger)
    max_disk_size: int | None = None  # the most a user may ask with --disk-size (None: disk_size only)
    networks: tuple[str, ...] = ()
    forwards: str | None = None  # as `--forward`: "ssh,http"
    on_logoff: str = "none"
    logoff_delay: int | None = None
    on_pressure: str = "refuse"
    user_options: tuple[str, ...] | None = None  # the user options its VMs take (None: the policy's user list)
    cloud_init: bool | None = None  # None: as the image is marked
    description: str = ""

    def digest(self) -> str:
        """What a VM made from this template records: a later edit shows as drift."""
        text: str = sha256(json.dumps(self._asdict(), sort_keys=True).encode()).hexdigest()
        return text[:16]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"options": list(self.options), "on_logoff": self.on_logoff}
        for key in ("image", "networks", "logoff_delay", "cloud_init"):
            v = getattr(self, key)
            if v not in (None, ()):
                d[key] = list(v) if isinstance(v, tuple) else v
        if self.forwards is not None:
            d["forwards"] = self.forwards.split(",")
        if self.disk_size is not None:
            d["disk_size"] = _show(self.disk_size)
        if self.max_disk_size is not None:
            d["max_disk_size"] = _show(self.max_disk_size)
        if self.on_pressure != "refuse":
            d["on_pressure"] = self.on_pressure
        if self.user_options is not None:
            d["user_options"] = list(self.user_options)
        if self.description:
            d["description"] = self.description
        return d


TEMPLATE_KEYS = {
    "description", "options", "image", "disk_size", "max_disk_size", "networks", "forwards",
    "on_logoff", "logoff_delay", "on_pressure", "user_options", "cloud_init",
}  # fmt: skip


def _strings(v: object, key: str, most: int = 64, longest: int = 4096) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > most or not all(isinstance(x, str) and len(x) <= longest for x in v):
        raise PolicyError(key, f"must be a list of at most {most} strings")
    return tuple(v)


def parse_template(name: str, data: Mapping[str, Any]) -> Template:
    """A template file's table, checked for shape (the policy checks its options,
    the library its image, the host its networks: `store.selfservice`)."""
    check_name(name)
    extra = sorted(set(data) - TEMPLATE_KEYS)
    if extra:
        raise PolicyError(extra[0], "unknown key")
    options = _strings(data.get("options", []), "options", 256)
    image = data.get("image")
    if image is not None and not (isinstance(image, str) and Regex(r"[a-z][a-z0-9_-]{0,31}").fullmatch(image)):
        raise PolicyError("image", "must be a library image name")
    size = data.get("disk_size")
    disk = parse_size(size, "disk_size") if size is not None else None
    top = data.get("max_disk_size")
    most = parse_size(top, "max_disk_size") if top is not None else None
    if image is None and disk is None:
        raise PolicyError("disk_size", "a template needs an image or a disk_size")
    if most is not None and disk is not None and most < disk:
        raise PolicyError("max_disk_size", "is below disk_size")
    networks = _strings(data.get("networks", []), "networks", 8, 16)
    forwards = data.get("forwards")
    if forwards is not None:
        forwards = ",".join(_strings(forwards, "forwards", 16, 32)) or "none"
    on_logoff = data.get("on_logoff", "none")
    if on_logoff not in ("none", "pause", "hibernate"):
        raise PolicyError("on_logoff", "must be none, pause or hibernate")
    delay = data.get("logoff_delay")
    if delay is not None and (not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= 7 * 86400):
        raise PolicyError("logoff_delay", "must be seconds between 0 and 604800")
    pressure = data.get("on_pressure", "refuse")
    if pressure not in ON_PRESSURE:
        raise PolicyError("on_pressure", "must be refuse or hibernate")
    user = data.get("user_options")
    user_options = None if user is None else _strings(user, "user_options", 64, 32)
    cloud = data.get("cloud_init")
    if cloud is not None and not isinstance(cloud, bool):
        raise PolicyError("cloud_init", "must be true or false")
    text = data.get("description", "")
    if not isinstance(text, str) or len(text) > 200 or not text.isprintable():
        raise PolicyError("description", "must be one printable line of at most 200 characters")
    return Template(
        name, options, image, disk, most, networks, forwards, on_logoff, delay, pressure, user_options, cloud, text
    )


# --------------------------------------------------------------------------- grants


class Grant(NamedTuple):
    """What one grant (or, merged, all the grants that match a user) allows.
    None: not limited by this grant."""

    templates: frozenset[str] = frozenset()
    vms: int = 1
    memory_mib: int | None = None  # the sum of -m of the user's VMs
    running_memory_mib: int | None = None  # the sum of -m of those running at once
    disk_bytes: int | None = None  # the sum of virtual sizes; and the sum of real bytes
    ports: int | None = None  # forwarded host ports

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"templates": sorted(self.templates), "vms": self.vms}
        if self.memory_mib is not None:
            d["memory"] = f"{self.memory_mib}M"
        if self.running_memory_mib is not None:
            d["running_memory"] = f"{self.running_memory_mib}M"
        if self.disk_bytes is not None:
            d["disk"] = _show(self.disk_bytes)
        if self.ports is not None:
            d["ports"] = self.ports
        return d


GRANT_KEYS = {"templates", "vms", "memory", "running_memory", "disk", "ports"}


def _count(v: object, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
        raise PolicyError(key, f"must be a whole number between 0 and {MAX_COUNT}")
    return v


def parse_grant(data: Mapping[str, Any]) -> Grant:
    extra = sorted(set(data) - GRANT_KEYS)
    if extra:
        raise PolicyError(extra[0], "unknown key")
    names = _strings(data.get("templates", []), "templates", MAX_TEMPLATES, 32)
    for n in names:
        check_name(n)

    def mib(key: str) -> int | None:
        v = data.get(key)
        return None if v is None else -(-parse_size(v, key, 0, 1 << 50) >> 20)  # whole MiB, rounded up

    disk = data.get("disk")
    ports = data.get("ports")
    return Grant(
        frozenset(names),
        _count(data.get("vms", 1), "vms"),
        mib("memory"),
        mib("running_memory"),
        None if disk is None else parse_size(disk, "disk", 0, 1 << 50),
        None if ports is None else _count(ports, "ports"),
    )


class Grants(NamedTuple):
    users: Mapping[str, Grant]
    groups: Mapping[str, Grant]


def parse_grants(data: Mapping[str, Any]) -> Grants:
    """grants.toml: `[user.NAME]` and `[group.NAME]` tables."""
    extra = sorted(set(data) - {"user", "group"})
    if extra:
        raise PolicyError(extra[0], "unknown table (grants are [user.NAME] and [group.NAME])")
    out: list[dict[str, Grant]] = []
    for kind in ("user", "group"):
        table = data.get(kind, {})
        if not isinstance(table, Mapping):
            raise PolicyError(kind, "must be a table of tables")
        parsed: dict[str, Grant] = {}
        for who, body in table.items():
            if not USER_NAME.fullmatch(who):
                raise PolicyError(f"{kind}.{who[:40]}", "not a user or group name")
            if not isinstance(body, Mapping):
                raise PolicyError(f"{kind}.{who}", "must be a table")
            try:
                parsed[who] = parse_grant(body)
            except (PolicyError, UsageError) as err:
                raise PolicyError(f"{kind}.{who}", str(err)) from None
        out.append(parsed)
    return Grants(out[0], out[1])


def _most(values: Iterable[int | None]) -> int | None:
    vs = list(values)
    return None if any(v is None for v in vs) else max(v for v in vs if v is not None)


def merge_grants(found: list[Grant]) -> Grant | None:
    """The most generous of the grants that match, limit by limit (None: no grant)."""
    if not found:
        return None
    return Grant(
        frozenset().union(*(g.templates for g in found)),
        max(g.vms for g in found),
        _most(g.memory_mib for g in found),
        _most(g.running_memory_mib for g in found),
        _most(g.disk_bytes for g in found),
        _most(g.ports for g in found),
    )


def grant_for(grants: Grants, user: str, groups: Iterable[str]) -> Grant | None:
    found = [grants.users[user]] if user in grants.users else []
    found += [grants.groups[g] for g in sorted(set(groups)) if g in grants.groups]
    return merge_grants(found)


# ------------------------------------------------------------------------- use, fit


class Use(NamedTuple):
    """What a user's VMs hold, measured (admin-made VMs included)."""

    vms: int = 0
    memory_mib: int = 0
    running_memory_mib: int = 0
    disk_virtual: int = 0
    disk_real: int = 0
    ports: int = 0

    def plus(self, other: Use) -> Use:
        return Use(*(a + b for a, b in zip(self, other, strict=True)))


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def over(use: Use, want: Use, grant: Grant) -> str | None:
    """The first limit that `use` plus `want` would pass, said with the use and the
    request; None if it fits. Running memory is the budget's to decide."""
    checks = (
        ("vms", grant.vms, use.vms, want.vms, str),
        ("memory", grant.memory_mib, use.memory_mib, want.memory_mib, show_mib),
        ("disk (virtual size)", grant.disk_bytes, use.disk_virtual, want.disk_virtual, _bytes),
        ("disk (real bytes)", grant.disk_bytes, use.disk_real, want.disk_real, _bytes),
        ("ports", grant.ports, use.ports, want.ports, str),
    )
    for what, limit, used, asked, show in checks:
        if asked > 0 and limit is not None and used + asked > limit:
            return f"over your {what} quota: you use {show(used)} of {show(limit)}, and this asks for {show(asked)}"
    return None


def rows(use: Use, grant: Grant | None) -> list[dict[str, Any]]:
    """`kvmgate quota`: each resource with its use and limit (None: unlimited)."""
    g = grant or Grant(vms=0)
    return [
        {"resource": "vms", "used": use.vms, "limit": g.vms, "unit": "count"},
        {"resource": "memory", "used": use.memory_mib, "limit": g.memory_mib, "unit": "MiB"},
        {"resource": "running_memory", "used": use.running_memory_mib, "limit": g.running_memory_mib, "unit": "MiB"},
        {"resource": "disk_virtual", "used": use.disk_virtual, "limit": g.disk_bytes, "unit": "bytes"},
        {"resource": "disk_real", "used": use.disk_real, "limit": g.disk_bytes, "unit": "bytes"},
        {"resource": "ports", "used": use.ports, "limit": g.ports, "unit": "count"},
    ]


# ------------------------------------------------------------------- running budget


class Running(NamedTuple):
    """A running VM as the budget sees it."""

    owner: str
    name: str
    memory_mib: int
    used: float  # when it was last used (its own start, thaw, console, gated; its owner's sessions)
    owner_present: bool  # its owner has a live session now
    may_hibernate: bool  # its settings allow hibernation under pressure (and it can hibernate)


def victims(running: list[Running], need_mib: int, budget_mib: int) -> list[Running] | None:
    """The least recently used VMs to hibernate, in order, so that `need_mib`
    more fits in `budget_mib`: [] if it fits already, None if it cannot fit even
    after hibernating every VM that allows it (then nothing is hibernated). VMs
    of owners who are logged on count as used now."""
    total = sum(r.memory_mib for r in running)
    if total + need_mib <= budget_mib:
        return []
    chosen: list[Running] = []
    for r in sorted((r for r in running if r.may_hibernate), key=lambda r: (r.owner_present, r.used, r.owner, r.name)):
        chosen.append(r)
        total -= r.memory_mib
        if total + need_mib <= budget_mib:
            return chosen
    return None


# --------------------------------------------------------------------- writing files


def toml_value(v: object) -> str:
    """TOML for the values these files hold (strings, whole numbers, booleans,
    lists of strings). JSON's string escapes are TOML's basic-string escapes."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


def template_text(t: Template) -> str:
    lines = [f'# kvmgate template {t.name} (kvmgate admin template add; docs/policy.md, "Templates")']
    lines += [f"{k} = {toml_value(v)}" for k, v in t.to_dict().items()]
    return "\n".join(lines) + "\n"


def grants_text(grants: Grants) -> str:
    lines = ['# kvmgate grants (kvmgate admin grant; docs/policy.md, "Grants")']
    for kind, table in (("user", grants.users), ("group", grants.groups)):
        for who in sorted(table):
            lines.append(f"\n[{kind}.{who}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table[who].to_dict().items()]
    return "\n".join(lines) + "\n"


def line_of(text: str, key: str) -> int:
    """The line a key or table is on in a file's text (1 if it is not found): the
    admin is told where, not only what."""
    leaf = key.rsplit(".", 1)[-1]
    table = re.compile(r"^\s*\[\s*" + re.escape(key) + r"\s*\]")
    assign = re.compile(r"^\s*" + re.escape(leaf) + r"\s*=")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if table.match(line):
            return i
    for i, line in enumerate(lines, 1):
        if assign.match(line):
            return i
    return 1
