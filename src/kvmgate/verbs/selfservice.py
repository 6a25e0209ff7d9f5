"""Self-service: users make and delete their own VMs from the admin's templates,
within their grants; the admin writes templates and grants and sees every
user's use (docs/policy.md, "Templates", "Grants").

A user-made VM is an ordinary kvmgate VM (identity, directory, audit, verbs);
its settings record the template it came from. Quotas are checked and the VM
made in one step under the owner's lock, from use measured on the host
(`ops.quota`), so concurrent creates never pass a limit.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from typing import Any

from kvmgate.errors import KvmgateError, NoSuchVM, PermissionRefused, PolicyError, UsageError, WrongState
from kvmgate.host import audit
from kvmgate.host.caller import Caller
from kvmgate.model import identity as ident
from kvmgate.model import qcow2
from kvmgate.model import selfservice as ss
from kvmgate.model.commands import Request
from kvmgate.model.policy.policy import Policy
from kvmgate.model.settings import Settings, parse_seconds
from kvmgate.model.translate import DEFAULT_MEM_MIB
from kvmgate.ops import lifecycle, quota, vms
from kvmgate.paths import Paths
from kvmgate.store import config, every, locks, registry
from kvmgate.store import selfservice as files
from kvmgate.store.files import flock, touch
from kvmgate.verbs.common import emit, owner_of, target


class NoSuchTemplate(NoSuchVM):
    def __init__(self, name: str) -> None:
        KvmgateError.__init__(self, f"no such template: {name[:40]}")


def run(req: Request, who: Caller, paths: Paths) -> int:
    verb = req.verb
    if verb.startswith("admin-"):  # the entry let only root through
        return _admin(req, who, paths)
    if verb == "templates":
        return templates(req, who, paths)
    if verb == "quota":
        return show_quota(req, paths, [owner_of(req, who)])
    if verb == "create":
        return create(req, who, paths)
    if verb == "delete":
        return delete(req, who, paths)
    raise UsageError(f"unknown verb {verb}")


def _admin(req: Request, who: Caller, paths: Paths) -> int:
    verb = req.verb.removeprefix("admin-")
    if verb == "template-add":
        return template_add(req, who, paths)
    if verb == "template-remove":
        return template_remove(req, who, paths)
    if verb == "template-list":
        return template_list(req, paths)
    if verb == "template-check":
        return template_check(req, paths)
    if verb == "grant":
        return grant(req, who, paths)
    if verb == "quota":
        owners = [ident.check_owner(req.name)] if req.name else _all_owners(paths)
        return show_quota(req, paths, owners)
    raise UsageError(f"unknown verb {req.verb}")


def _loaded(paths: Paths, policy: Policy, admin: bool) -> files.Loaded:
    loaded = files.load(paths, policy)
    if admin and loaded.errors:  # users keep the last good set; the admin is told
        for e in loaded.errors[:5]:
            print(f"kvmgate: warning: {e} (users keep the last good templates and grants)", flush=True)
    return loaded


def memory_mib(policy: Policy, t: ss.Template) -> int:
    for o in policy.parse(list(t.options), "admin"):
        if o.name == "-m":
            return int(getattr(o.value, "number", DEFAULT_MEM_MIB))
    return DEFAULT_MEM_MIB


def _describe(policy: Policy, t: ss.Template) -> dict[str, Any]:
    d = t.to_dict()
    d["name"] = t.name
    d["memory_mib"] = memory_mib(policy, t)
    return d


# ------------------------------------------------------------------------ users


def templates(req: Request, who: Caller, paths: Paths) -> int:
    policy = config.load(paths)
    loaded = _loaded(paths, policy, who.is_root)
    g = files.grant_of(loaded, who.name)
    names = sorted(n for n in (g.templates if g else ()) if n in loaded.templates)
    rows = [_describe(policy, loaded.templates[n]) for n in names]
    text = "".join(
        f"{r['name']:<20} {ss.show_mib(r['memory_mib']):>8}  "
        + (f"image {r['image']}" if r.get("image") else f"disk {r.get('disk_size')}")
        + (f" (up to {r['max_disk_size']})" if r.get("max_disk_size") else "")
        + (f"  {r['description']}" if r.get("description") else "")
        + "\n"
        for r in rows
    )
    emit(rows, text or "no templates are granted to you\n", req.as_json)
    return 0


def create(req: Request, who: Caller, paths: Paths) -> int:
    name = ident.check_name(req.name or "")
    owner = who.name
    if who.is_root:
        raise UsageError("root makes VMs for users with kvmgate admin create --owner USER")
    policy = config.load(paths)
    loaded = files.load(paths, policy)
    t = files.granted_template(loaded, owner, req.flag("--template") or "")
    g = files.grant_of(loaded, owner)
    assert g is not None  # granted_template refused otherwise
    asked = req.flag("--disk-size")
    size = ss.parse_size(asked) if asked is not None else None
    most = t.max_disk_size if t.max_disk_size is not None else t.disk_size
    if size is not None and (most is None or size > most):
        limit = f"its maximum of {ss.show_mib(most >> 20)}" if most else "no --disk-size (it uses its image's size)"
        raise PolicyError("--disk-size", f"{asked} is over template {t.name}'s maximum: {limit}")
    rec = None
    if t.image is not None:
        from kvmgate.store import images

        try:
            rec = images.read(paths, t.image)
        except KvmgateError:
            raise WrongState(f"template {t.name}'s image is not in the library now: ask the administrator") from None
    virtual = max(size or t.disk_size or 0, rec.virtual_size if rec else 0)
    head = len(qcow2.empty_image(virtual).head)  # what a new disk takes at once
    forwards = len(t.forwards.split(",")) if t.forwards and t.forwards != "none" else 0
    want = ss.Use(1, memory_mib(policy, t), 0, virtual, head, forwards)
    identity = ident.Identity(owner, name, t.options)
    settings = Settings(
        on_logoff=t.on_logoff,
        logoff_delay=t.logoff_delay,
        on_pressure=t.on_pressure,
        template=t.name,
        template_digest=t.digest(),
        user_options=t.user_options,
        cloud_init=t.cloud_init if t.cloud_init is not None else bool(rec and rec.cloud_init),
    )
    net = vms.Network(list(t.networks) or None, t.forwards, None)
    with files.owner_lock(paths, owner, locks.WAIT):
        if os.path.lexists(os.path.join(paths.names, owner, name)):
            raise WrongState(f"you already have a VM named {name}")
        use = quota.use_of(paths, policy, owner)
        refusal = ss.over(use, want, g)
        if refusal:
            raise PolicyError("quota", refusal)
        vm = vms.create(paths, who, identity, settings, net, t.image, virtual or None,
                        audit_extra={"template": t.name, "disk_size": virtual})  # fmt: skip
    print(f"created {name} from template {t.name} ({vm.vmdir}); start it with: kvmgate start {name}")
    return 0


def delete(req: Request, who: Caller, paths: Paths) -> int:
    vm = target(req, who, paths)
    with files.owner_lock(paths, vm.identity.owner, locks.WAIT), lifecycle.lock(paths, who, vm):
        settings = registry.read_settings(vm)
        if settings.template is None and not who.is_root:
            raise PermissionRefused(f"{vm.identity.name} was made by the administrator: ask them to delete it")
        d = vms.delete(paths, who, vm, req.has("--keep-disks"), req.has("--force"), "delete")
    print(d.said(vm.identity.name))
    return 0


def _all_owners(paths: Paths) -> list[str]:
    owners = {o for o, _ in every.list_names(paths)}
    with_grants = files.load(paths, config.load(paths)).grants.users
    return sorted(owners | set(with_grants))


def show_quota(req: Request, paths: Paths, owners: list[str]) -> int:
    policy = config.load(paths)
    loaded = _loaded(paths, policy, len(owners) != 1 or req.verb == "admin-quota")
    out: list[dict[str, Any]] = []
    for owner in owners:
        g = files.grant_of(loaded, owner)
        use = quota.use_of(paths, policy, owner)
        out.append({"user": owner, "granted": g is not None, "templates": sorted(g.templates) if g else [],
                    "resources": ss.rows(use, g)})  # fmt: skip
    lines = []
    for o in out:
        names: list[str] = o["templates"]
        lines.append(f"{o['user']}: " + ("templates " + ", ".join(names) if o["granted"] else "no grant"))
        resources: list[dict[str, Any]] = o["resources"]
        for r in resources:
            lines.append(f"  {r['resource']:<15} {_amount(r['used'], r['unit']):>12} of {_limit(r)}")
    data: object = out if req.verb == "admin-quota" else out[0]
    emit(data, "\n".join(lines) + "\n", req.as_json)
    return 0


def _amount(n: int, unit: str) -> str:
    if unit == "bytes":
        return f"{n / (1 << 30):.2f} GiB"
    return ss.show_mib(n) if unit == "MiB" else str(n)


def _limit(r: dict[str, Any]) -> str:
    return "unlimited" if r["limit"] is None else _amount(r["limit"], r["unit"])


# ------------------------------------------------------------------------ admin


def template_add(req: Request, who: Caller, paths: Paths) -> int:
    name = ident.check_name(req.name or "")
    policy = config.load(paths)
    delay = req.flag("--logoff-delay")
    user = req.flag("--user-options")
    forward = req.flag("--forward")
    net = req.flag("--network")
    data: dict[str, Any] = {"options": list(req.options), "on_logoff": req.flag("--on-logoff") or "none"}
    for flag, key in (("--image", "image"), ("--disk-size", "disk_size"), ("--max-disk-size", "max_disk_size"),
                      ("--on-pressure", "on_pressure"), ("--description", "description")):  # fmt: skip
        if req.flag(flag) is not None:
            data[key] = req.flag(flag)
    if delay is not None:
        data["logoff_delay"] = parse_seconds(delay, "--logoff-delay", "at once")
    if user is not None:
        data["user_options"] = [u for u in user.split(",") if u]
    if forward is not None:
        data["forwards"] = [f for f in forward.split(",") if f]
    if net is not None:
        data["networks"] = [n for n in net.split(",") if n]
    if req.flag("--cloud-init") is not None:
        data["cloud_init"] = req.flag("--cloud-init") == "on"
    t = files.validate_template(policy, ss.parse_template(name, data))
    if t.image is not None:
        from kvmgate.store import images

        images.read(paths, t.image)  # refused now, not at a user's create
    path = os.path.join(files.templates_dir(paths), f"{name}.toml")
    replaced = os.path.exists(path)
    files.write_template(paths, policy, t)
    audit.done(paths.audit_log, who, "admin template add", "", name, template=t.to_dict(), replaced=replaced)
    print(f"template {name} {'replaced' if replaced else 'added'}: {path}")
    return 0


def template_remove(req: Request, who: Caller, paths: Paths) -> int:
    name = ident.check_name(req.name or "")
    if not files.remove_template(paths, name):
        raise NoSuchTemplate(name)
    made = [vm.identity for vm in every.each_vm(paths) if _template_of(vm) == name]
    audit.done(paths.audit_log, who, "admin template remove", "", name, vms=len(made))
    stay = f"; {len(made)} VM(s) made from it stay (admin show marks them)" if made else ""
    print(f"template {name} removed{stay}")
    return 0


def _template_of(vm: registry.VM) -> str | None:
    try:
        return registry.read_settings(vm).template
    except KvmgateError:
        return None


def template_list(req: Request, paths: Paths) -> int:
    policy = config.load(paths)
    loaded = _loaded(paths, policy, True)
    counts: dict[str, int] = {}
    for vm in every.each_vm(paths):
        t = _template_of(vm)
        if t:
            counts[t] = counts.get(t, 0) + 1
    rows = []
    for n in sorted(loaded.templates):
        d = _describe(policy, loaded.templates[n])
        d["granted_to"] = sorted([u for u, g in loaded.grants.users.items() if n in g.templates]
                                 + [f"@{x}" for x, g in loaded.grants.groups.items() if n in g.templates])  # fmt: skip
        d["vms"] = counts.get(n, 0)
        rows.append(d)
    text = "".join(
        f"{r['name']:<20} {ss.show_mib(r['memory_mib']):>8}  {' '.join(r['options'])}  "
        f"granted to: {', '.join(r['granted_to']) or 'nobody'}; VMs: {r['vms']}\n"
        for r in rows
    )
    emit({"templates": rows, "errors": list(loaded.errors)} if req.as_json else rows, text or "no templates\n",
         req.as_json)  # fmt: skip
    return 0


def template_check(req: Request, paths: Paths) -> int:
    """Every file parsed afresh (not the cache, not the last good set)."""
    raw, errors, read = files.parse_files(paths, config.load(paths), files.all_files(paths))
    warnings = []
    for kind, table in raw.get("grants", {}).items():
        for whom, body in table.items():
            for n in body.get("templates", []) if isinstance(body, dict) else []:
                if n not in raw["templates"]:
                    warnings.append(
                        f"{files.grants_file(paths)}: {kind}.{whom} names template {n!r}, which does not exist"
                    )
    if req.as_json:
        emit({"ok": not errors, "errors": errors, "warnings": warnings, "files": read}, "", True)
    else:
        for line in errors:
            print(line)
        for line in warnings:
            print(f"warning: {line}")
        if not errors:
            print(f"ok: {len(read)} file(s), {len(raw['templates'])} template(s)")
    if errors:
        import sys

        sys.stderr.write(f"kvmgate: {len(errors)} error(s) in the template and grant files; users keep the last "
                         "good set\n")  # fmt: skip
        return PolicyError.exit_code
    return 0


def grant(req: Request, who: Caller, paths: Paths) -> int:
    whom = req.name or ""
    group = whom.startswith("@")
    key = whom[1:] if group else whom
    if not ss.USER_NAME.fullmatch(key):
        raise UsageError(f"{whom[:40]!r} is not a user or @group name")
    try:
        grp.getgrnam(key) if group else pwd.getpwnam(key)
    except KeyError:
        raise UsageError(f"no such {'group' if group else 'user'}: {key}") from None
    policy = config.load(paths)
    with flock(os.path.join(locks.lock_dir(paths), "grants"), 60, "the grants file"):
        current = _current_grants(paths)
        users, groups = dict(current.users), dict(current.groups)
        table = groups if group else users
        if req.has("--revoke"):
            if key not in table:
                raise NoSuchVM(f"no grant for {whom}")
            del table[key]
            change: dict[str, Any] = {"revoked": True}
        else:
            g = _grant_from(req, paths)
            table[key] = g
            change = g.to_dict()
        files.write_grants(paths, policy, ss.Grants(users, groups))
        if not group and not req.has("--revoke"):
            touch(files.owner_lock_path(paths, key))  # taking it at a refused create then changes nothing
    audit.done(paths.audit_log, who, "admin grant", key if not group else "", whom, **change)
    print(f"{whom}: " + ("grant revoked" if req.has("--revoke") else json.dumps(change, sort_keys=True)))
    return 0


def _current_grants(paths: Paths) -> ss.Grants:
    """The grants file as it is now; one with an error is not rewritten blindly."""
    path = files.grants_file(paths)
    if not os.path.exists(path):
        return files.EMPTY
    try:
        text = files.read_checked(path)
        import tomllib

        return ss.parse_grants(tomllib.loads(text))
    except (OSError, ValueError, PolicyError, UsageError) as err:
        why = f"{path} has an error ({err}): fix it first (kvmgate admin template check)"
        raise PolicyError("grants", why) from None


def _grant_from(req: Request, paths: Paths) -> ss.Grant:
    names = [n for n in (req.flag("--templates") or "").split(",") if n]
    if not names:
        raise UsageError("admin grant needs --templates T[,T...] (or --revoke)")
    for n in names:
        ident.check_name(n)
        if not os.path.exists(os.path.join(files.templates_dir(paths), f"{n}.toml")):
            raise NoSuchTemplate(n)
    data: dict[str, Any] = {"templates": names}
    for flag, key in (("--vms", "vms"), ("--ports", "ports")):
        raw = req.flag(flag)
        if raw is not None:
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
                raise UsageError(f"{flag} takes a whole number up to {ss.MAX_COUNT}")
            data[key] = int(raw)
    for flag, key in (("--memory", "memory"), ("--running-memory", "running_memory"), ("--disk", "disk")):
        if req.flag(flag) is not None:
            data[key] = req.flag(flag)
    try:
        return ss.parse_grant(data)
    except PolicyError as err:
        raise UsageError(f"--{err.option.replace('_', '-')}: {err.reason}") from None
