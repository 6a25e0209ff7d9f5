"""The effective policy: default lists plus the admin's TOML overrides, and option parsing.

`Policy.from_dict` is pure (the caller reads and checks the file), so every rule
here is tested without touching the host. Unknown keys are refused: a typo in a
policy file must not silently fall back to a default.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from kvmgate.errors import PolicyError
from kvmgate.model.policy import grammar as g
from kvmgate.model.policy import network
from kvmgate.model.policy.table import LISTS, OPTIONS, ListName, OptionSpec
from kvmgate.model.regex import Regex
from kvmgate.model.slurm import Backend, parse_backend

ACCELS = ("auto", "kvm", "tcg")


class ParsedOption(NamedTuple):
    spec: OptionSpec
    value: g.Value

    @property
    def name(self) -> str:
        return self.spec.name

    def tokens(self) -> list[str]:
        return [self.name] if self.spec.parse is None else [self.name, self.value.canonical]


SERVICE_NAME = Regex(r"[a-z][a-z0-9_.-]{0,31}", re.ASCII)
DEFAULT_LISTS: Mapping[str, ListName] = MappingProxyType({n: o.default for n, o in OPTIONS.items()})


class Policy(NamedTuple):
    lists: Mapping[str, ListName] = DEFAULT_LISTS
    limits: g.Limits = g.Limits()
    accel: str = "auto"
    qemu: str = "/usr/bin/qemu-system-x86_64"
    qemu_data: tuple[str, ...] = ()  # QEMU's firmware and data directories (-L), for a QEMU beside the system's
    stop_timeout: int = 30
    memory_overhead_mib: int = 256
    max_open_files: int = 4096
    audit_burst: int = 20  # refusals recorded at once per caller (host.audit)...
    audit_refill_seconds: int = 5  # ...then one per this many seconds
    console_log_mib: int = 8  # each VM's console log, bounded as it is written (model.consolelog)
    logoff_delay_seconds: int = 60  # --on-logoff acts after this long without a session (per VM: admin set)
    logon_services: tuple[str, ...] = ("sshd", "login")  # logind sessions of these PAM services are logons
    running_memory_budget_mib: int = 0  # the host's guest RAM running at once (0: no budget; ops.budget)
    net: network.HostNet = network.default()
    backend: Backend = Backend()  # where VMs run: this host, or a Slurm cluster (model.slurm)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        def fail(msg: str) -> PolicyError:
            return PolicyError("policy", msg)

        known = {"accel", "qemu", "qemu_data", "stop_timeout", "memory_overhead_mib", "max_open_files"}
        known |= {"lists", "limits"}
        known |= {"audit_burst", "audit_refill_seconds", "console_log_mib", "logoff_delay_seconds", "logon_services"}
        known |= {"host", "ports", "vnc", "networks", "running_memory_budget_mib", "backend"}
        extra = set(data) - known
        if extra:
            raise fail(f"unknown key {sorted(extra)[0]!r}")
        kw: dict[str, Any] = {}
        accel = data.get("accel", "auto")
        if accel not in ACCELS:
            raise fail("accel must be one of " + ", ".join(ACCELS))
        kw["accel"] = accel

        def absolute(p: object) -> bool:
            return isinstance(p, str) and p.startswith("/") and posixpath.normpath(p) == p

        qemu = data.get("qemu", cls._field_defaults["qemu"])
        if not absolute(qemu):
            raise fail("qemu must be a normalised absolute path")
        kw["qemu"] = qemu
        data_dirs = data.get("qemu_data", [])
        if (
            not isinstance(data_dirs, list)
            or len(data_dirs) > 8
            or not all(absolute(d) and "," not in d for d in data_dirs)
        ):
            raise fail("qemu_data must be a list of at most 8 normalised absolute paths without commas")
        kw["qemu_data"] = tuple(data_dirs)
        for key, lo, hi in (
            ("stop_timeout", 1, 3600),
            ("memory_overhead_mib", 32, 65536),
            ("max_open_files", 256, 1 << 20),
            ("audit_burst", 1, 1 << 20),
            ("audit_refill_seconds", 1, 3600),
            ("console_log_mib", 1, 1024),
            ("logoff_delay_seconds", 0, 7 * 86400),
            ("running_memory_budget_mib", 0, 1 << 30),
        ):
            if key in data:
                v = data[key]
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                    raise fail(f"{key} must be an integer between {lo} and {hi}")
                kw[key] = v
        services = data.get("logon_services", list(cls._field_defaults["logon_services"]))
        if (
            not isinstance(services, list)
            or not 1 <= len(services) <= 16
            or not all(isinstance(x, str) and SERVICE_NAME.fullmatch(x) for x in services)
        ):
            raise fail("logon_services must be a list of 1 to 16 PAM service names")
        kw["logon_services"] = tuple(services)
        kw["lists"] = cls._lists(data.get("lists", {}), fail)
        kw["limits"] = cls._limits(data.get("limits", {}), fail)
        kw["net"] = network.parse(data)
        kw["backend"] = parse_backend(data.get("backend", {}))
        return cls(**kw)

    @staticmethod
    def _lists(moves: Any, fail: Any) -> dict[str, ListName]:
        lists: dict[str, ListName] = {n: o.default for n, o in OPTIONS.items()}
        if not isinstance(moves, Mapping):
            raise fail("[lists] must be a table")
        seen: set[str] = set()
        for lname, names in moves.items():
            if lname not in LISTS:
                raise fail(f"unknown list {lname!r} (lists are user, admin, unused)")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise fail(f"lists.{lname} must be a list of option names")
            for n in names:
                spec = OPTIONS.get(n)
                if spec is None:
                    raise fail(f"lists.{lname}: unknown option {n!r}")
                if n in seen:
                    raise fail(f"{n} is in more than one list")
                seen.add(n)
                if spec.fixed and lname != "unused":
                    why = (
                        "a gdb stub hands its holder QEMU's monitor"
                        if n in ("-s", "-p")
                        else "kvmgate manages it itself"
                    )
                    raise fail(f"{n} cannot be enabled: {why}")
                if lname == "user" and not spec.user_ok:
                    raise fail(f"{n} cannot be given to users: it hands out a host resource")
                lists[n] = lname
        return lists

    @staticmethod
    def _limits(data: Any, fail: Any) -> g.Limits:
        if not isinstance(data, Mapping):
            raise fail("[limits] must be a table")
        d = g.Limits()
        ints = {
            "mem_min_mib": (1, 1 << 22),
            "mem_max_mib": (1, 1 << 22),
            "smp_max": (1, 1024),
            "append_max": (0, 4096),
            "image_max_gib": (1, 1 << 16),
            "snapshot_max_mib": (16, 1 << 24),
            "blobs_max_mib": (1, 4096),
            "repeat_max": (1, 64),
            "import_max_minutes": (1, 7 * 24 * 60),
            "keys_max_kib": (1, 1024),
        }
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in ints:
                lo, hi = ints[key]
                if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                    raise fail(f"limits.{key} must be an integer between {lo} and {hi}")
                kw[key] = value
            elif key == "vnc":
                if (
                    not isinstance(value, list)
                    or len(value) != 2
                    or not all(isinstance(v, int) for v in value)
                    or not 0 <= value[0] <= value[1] <= 999
                ):
                    raise fail("limits.vnc must be [first, last] display numbers within 0..999")
                kw["vnc_min"], kw["vnc_max"] = value
            elif key == "machines":
                if not isinstance(value, list) or not value or not all(v in ("pc", "q35") for v in value):
                    raise fail("limits.machines must be a non-empty list from pc, q35")
                kw["machines"] = tuple(value)
            else:
                raise fail(f"unknown key limits.{key}")
        lim = d._replace(**kw)
        if lim.mem_min_mib > lim.mem_max_mib:
            raise fail("limits.mem_min_mib is above limits.mem_max_mib")
        return lim

    # ------------------------------------------------------------------ parsing
    def list_of(self, option: str) -> ListName:
        return self.lists[option]

    def parse(self, tokens: Sequence[str], who: str, only: Sequence[str] | None = None) -> list[ParsedOption]:
        """Parse `tokens` in the note's vocabulary for `who` ("user" or "admin"),
        and, given `only` (a template's user options), no option outside it.

        Only exact option names from the table are options: QEMU's own spellings
        (`--m`, `-m=256`, abbreviations) and a stray `--` are refused, so no token
        can mean something to QEMU that it did not mean here.
        """
        allowed: tuple[ListName, ...] = ("user",) if who == "user" else ("user", "admin")
        out: list[ParsedOption] = []
        seen: set[str] = set()
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            spec = OPTIONS.get(tok)
            if spec is None:
                if tok == "--":
                    raise PolicyError("--", "not allowed among VM options")
                if tok.startswith("-"):
                    base = tok.lstrip("-").split("=", 1)[0]
                    hint = f" (did you mean -{base}?)" if "-" + base in OPTIONS and "-" + base != tok else ""
                    raise PolicyError(tok.split("=", 1)[0], "unknown option" + hint)
                raise PolicyError(tok[:40], "expected an option, got a bare value")
            where = self.lists[tok]
            if only is not None and tok not in only:
                raise PolicyError(tok, "this VM's template does not let you set it")
            if where not in allowed:
                if where == "unused":
                    raise PolicyError(tok, "not used on this host")
                raise PolicyError(tok, "only the administrator may set this option")
            if tok in seen and not spec.repeatable:
                raise PolicyError(tok, "given more than once")
            seen.add(tok)
            if spec.repeatable and sum(1 for o in out if o.spec is spec) >= self.limits.repeat_max:
                raise PolicyError(tok, f"given more than {self.limits.repeat_max} times (limits.repeat_max)")
            if spec.parse is None:
                value: g.Value = g.parse_flag(tok, None, self.limits)
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise PolicyError(tok, "needs a value")
                raw = tokens[i + 1]
                if raw.startswith("-"):
                    raise PolicyError(tok, "value must not start with '-'")
                value = spec.parse(tok, raw, self.limits)
                i += 2
            out.append(ParsedOption(spec, value))
        return out
