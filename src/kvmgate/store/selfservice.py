"""The admin's self-service files: templates and grants, read strictly, with the
last good set kept for users.

    ETC/templates/NAME.toml      root 0644   one template each (model.selfservice.Template)
    ETC/grants.toml              root 0644   [user.NAME] and [group.NAME] grants
    STATE/selfservice.good.json  root 0600   the last set that validated completely
    RUN/selfservice.cache.json   root 0600   the parse, keyed by every file's identity and times

The files are one unit: if any of them has an error (TOML, shape, an option the
policy refuses, a network it does not know), users keep the last good set, and
root is told each error with its file and line (`admin template check`, and a
warning from every admin verb that reads them). With no good set yet, nothing is
granted: a broken file never grants more than the admin wrote.

Files are trusted only if root alone can change them, like the policy.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from typing import Any, NamedTuple

from kvmgate.errors import KvmgateError, PolicyError, UsageError
from kvmgate.model import selfservice as ss
from kvmgate.model.digest import sha256
from kvmgate.model.policy.policy import Policy
from kvmgate.paths import Paths
from kvmgate.store.files import flock, write_atomic
from kvmgate.store.locks import lock_dir

MAX_FILE = 64 << 10


def templates_dir(paths: Paths) -> str:
    return os.path.join(paths.etc, "templates")


def grants_file(paths: Paths) -> str:
    return os.path.join(paths.etc, "grants.toml")


def in_use(paths: Paths) -> bool:
    """Does this host use self-service at all? (Cheap: the start path asks.)"""
    return os.path.exists(grants_file(paths))


class Loaded(NamedTuple):
    templates: dict[str, ss.Template]
    grants: ss.Grants
    errors: tuple[str, ...] = ()  # "FILE:LINE: what" for each error; then the set is the last good one


EMPTY = ss.Grants({}, {})


def all_files(paths: Paths) -> list[str]:
    d = templates_dir(paths)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return [d]  # read as a file, it is refused with its reason
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".toml") and not n.startswith("."))
    except FileNotFoundError:
        names = []
    out = [os.path.join(d, n) for n in names[: ss.MAX_TEMPLATES + 1]]  # one more: "too many" is an error
    return out + ([grants_file(paths)] if os.path.lexists(grants_file(paths)) else [])


def _read(path: str) -> tuple[str, list[int]]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PolicyError("templates", "the directory must be owned by root and not writable by others")
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError("file", "is not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PolicyError("file", "must be owned by root and not writable by others")
        if st.st_size > MAX_FILE:
            raise PolicyError("file", f"is larger than {MAX_FILE >> 10} KiB")
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="strict"), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def read_checked(path: str) -> str:
    """A template or grant file's text, if root alone can change it."""
    return _read(path)[0]


def _stamp(paths: Paths, files: list[str]) -> list[Any]:
    out: list[Any] = []
    for p in [paths.policy, templates_dir(paths), *files]:  # the policy validates the templates too
        try:
            st = os.lstat(p)
            out.append([p, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        except OSError:
            out.append([p])
    return out


def _toml(text: str, path: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        line = 1
        if "(at line " in msg:
            with contextlib.suppress(ValueError):
                line = int(msg.split("(at line ", 1)[1].split(",", 1)[0])
        raise _Located(f"{path}:{line}: {msg.split(' (at line ')[0]}") from None


class _Located(Exception):
    pass


def validate_template(policy: Policy, t: ss.Template) -> ss.Template:
    """The template's options as `admin create` takes them (canonical), its
    networks and its user options checked against the policy."""
    opts = policy.parse(list(t.options), "admin")
    tokens = tuple(tok for o in opts for tok in o.tokens())
    for n in t.networks:
        if n not in policy.net.networks:
            raise PolicyError("networks", f"no network {n!r} in the policy")
    if t.networks and any(o.name == "-net" for o in opts):
        raise PolicyError("networks", "use either named networks or -net options, not both")
    if t.image and any(o.name == "-hda" for o in opts):
        raise PolicyError("options", "a template with an image leaves out -hda (the image's overlay is the disk)")
    for u in t.user_options or ():
        if u not in policy.lists or policy.lists[u] != "user":
            raise PolicyError("user_options", f"{u} is not on the policy's user list")
    if t.forwards is not None:
        from kvmgate.model.policy.network import parse_forwards

        for f in parse_forwards(t.forwards, policy.net.ports):
            if f.port is not None:
                raise PolicyError("forwards", "a template's forwards take no fixed host port (@PORT)")
    return t._replace(options=tokens)


def parse_all(policy: Policy, texts: dict[str, str], grants_path: str) -> tuple[dict[str, Any], list[str]]:
    """Parse and validate every file's text: (the raw set, the errors)."""
    errors: list[str] = []
    raw: dict[str, Any] = {"templates": {}, "grants": {}}
    for path, text in texts.items():
        try:
            data = _toml(text, path)
        except _Located as err:
            errors.append(str(err))
            continue
        try:
            if path == grants_path:
                ss.parse_grants(data)
                raw["grants"] = data
            else:
                name = os.path.basename(path)[: -len(".toml")]
                validate_template(policy, ss.parse_template(name, data))
                raw["templates"][name] = data
        except (PolicyError, UsageError) as err:
            errors.append(f"{path}:{ss.line_of(text, _key_of(err))}: {_what(err)}")
    return raw, errors


def _key_of(err: KvmgateError) -> str:
    """The key an error is about, to find its line: a QEMU option's is `options`."""
    key = getattr(err, "option", None) or str(err).split(" ", 1)[0].rstrip(":")
    if key.startswith("-"):
        return "options"
    return key


def _what(err: KvmgateError) -> str:
    return str(err).removeprefix("policy: ")


def _build(policy: Policy, raw: dict[str, Any]) -> tuple[dict[str, ss.Template], ss.Grants]:
    templates = {n: validate_template(policy, ss.parse_template(n, d)) for n, d in raw["templates"].items()}
    return templates, ss.parse_grants(raw["grants"])


def parse_files(paths: Paths, policy: Policy, files: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Every file read afresh and checked: (the raw set, the errors, the files read)."""
    texts: dict[str, str] = {}
    errors = []
    if sum(1 for p in files if p != grants_file(paths)) > ss.MAX_TEMPLATES:
        errors.append(f"{templates_dir(paths)}:1: more than {ss.MAX_TEMPLATES} templates")
    for p in files:
        try:
            texts[p] = _read(p)[0]
        except (OSError, UnicodeDecodeError, PolicyError) as err:
            errors.append(f"{p}:1: {err}")
    raw, more = parse_all(policy, texts, grants_file(paths))
    return raw, errors + more, sorted(texts)


def load(paths: Paths, policy: Policy) -> Loaded:
    files = all_files(paths)
    if not files:  # no self-service on this host: nothing granted, and nothing written (no cache)
        return Loaded({}, EMPTY)
    stamp = _stamp(paths, files)
    cache = os.path.join(paths.run, "selfservice.cache.json")
    entry = _json(cache)
    if entry is not None and entry.get("stamp") == stamp:
        raw, errors = entry.get("raw"), entry.get("errors")
        errors = [str(e) for e in errors] if isinstance(errors, list) else ["the cache is damaged"]
    else:
        raw, errors, _ = parse_files(paths, policy, files)
        good = os.path.join(paths.state, "selfservice.good.json")
        if not errors:
            with contextlib.suppress(OSError):
                write_atomic(good, json.dumps(raw))
        with contextlib.suppress(OSError):
            os.makedirs(paths.run, 0o700, exist_ok=True)
            write_atomic(cache, json.dumps({"stamp": stamp, "raw": raw, "errors": errors}))
    if errors:
        raw = _json(os.path.join(paths.state, "selfservice.good.json")) or {"templates": {}, "grants": {}}
    try:
        templates, grants = _build(policy, raw if isinstance(raw, dict) else {})
    except (PolicyError, UsageError, KeyError, TypeError, AttributeError) as err:
        # The last good set no longer validates (the policy changed since): nothing is granted.
        return Loaded({}, EMPTY, (*errors, f"the last good set no longer validates: {err}"))
    return Loaded(templates, grants, tuple(errors))


def _json(path: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o077:
            return None
        data = json.loads(os.read(fd, 8 << 20))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def groups_of(user: str) -> list[str]:
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return []
    out = []
    for gid in os.getgrouplist(user, pw.pw_gid):
        with contextlib.suppress(KeyError):
            out.append(grp.getgrgid(gid).gr_name)
    return out


def grant_of(loaded: Loaded, user: str) -> ss.Grant | None:
    return ss.grant_for(loaded.grants, user, groups_of(user))


def granted_template(loaded: Loaded, user: str, name: str) -> ss.Template:
    """The template, if the user's grants name it; a missing and an ungranted one
    are the same refusal (exit 3)."""
    grant = grant_of(loaded, user)
    t = loaded.templates.get(name)
    if t is None or grant is None or name not in grant.templates:
        raise PolicyError("--template", f"no template {name[:40]!r} is granted to you (kvmgate templates)")
    return t


# ---------------------------------------------------------------------- writing


def write_template(paths: Paths, policy: Policy, t: ss.Template) -> None:
    text = ss.template_text(t)
    _check_then_write(paths, policy, os.path.join(templates_dir(paths), f"{t.name}.toml"), text)


def write_grants(paths: Paths, policy: Policy, grants: ss.Grants) -> None:
    _check_then_write(paths, policy, grants_file(paths), ss.grants_text(grants))


def _check_then_write(paths: Paths, policy: Policy, path: str, text: str) -> None:
    """Refuse to write a file kvmgate would refuse to read."""
    _, errors = parse_all(policy, {path: text}, grants_file(paths))
    if errors:
        raise PolicyError("file", errors[0].split(": ", 1)[-1])
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, 0o755, exist_ok=True)
        os.chmod(folder, 0o755)  # the helper's umask is 077
    write_atomic(path, text, 0o644)


def remove_template(paths: Paths, name: str) -> bool:
    try:
        os.unlink(os.path.join(templates_dir(paths), f"{name}.toml"))
    except FileNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------ locks


def _key(what: str) -> str:
    text: str = sha256(what.encode()).hexdigest()
    return text[:32]


def owner_lock_path(paths: Paths, owner: str) -> str:
    """Made when the admin grants the user something (so that taking it changes
    nothing on disk), or at first use."""
    return os.path.join(lock_dir(paths), f"owner-{_key(owner)}")


@contextlib.contextmanager
def owner_lock(paths: Paths, owner: str, timeout: float) -> Iterator[None]:
    """One per owner, before any of their VMs' locks (docs/architecture.md):
    creates, deletes and budgeted starts check and reserve in one step under it."""
    with flock(owner_lock_path(paths, owner), timeout, f"{owner}'s VMs"):
        yield


@contextlib.contextmanager
def budget_lock(paths: Paths, timeout: float) -> Iterator[None]:
    """The host-wide running-memory budget: before any owner's lock."""
    with flock(os.path.join(lock_dir(paths), "budget"), timeout, "the host's memory budget"):
        yield
