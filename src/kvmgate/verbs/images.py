"""The image library and imports: `admin image add|list|remove`, `admin import`,
and what users may see: `kvmgate images`, `kvmgate keys`.

Every file comes in through `host.imports` (checked, then converted by
qemu-img as an unprivileged account). Adding takes the time a convert takes,
outside any lock; publishing and removing happen under the allocation lock,
where `admin create --image` also looks the image up.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import stat
import time
from typing import Any

from kvmgate.errors import FileRefused, UsageError, WrongState
from kvmgate.host import audit, imports
from kvmgate.host.caller import Caller
from kvmgate.model import images as model
from kvmgate.model.commands import Request
from kvmgate.paths import IMAGE_USER, Paths
from kvmgate.store import config, jobs, locks, registry
from kvmgate.store import images as library
from kvmgate.verbs.common import emit, target


def run(req: Request, who: Caller, paths: Paths) -> int:
    if req.verb == "images":
        return offered(req, paths)
    if req.verb == "keys":
        return keys(req, who, paths)
    if not who.is_root:  # entry refuses admin verbs already; this module never relies on it
        raise UsageError("admin commands are for root only")
    if req.verb == "admin-image-add":
        return add(req, who, paths)
    if req.verb == "admin-image-list":
        return listing(req, paths)
    if req.verb == "admin-image-remove":
        return remove(req, who, paths)
    if req.verb == "admin-import":
        return import_disk(req, who, paths)
    raise UsageError(f"unknown verb {req.verb}")


def _file(req: Request) -> str:
    path = req.flag("FILE")
    if not path:
        raise UsageError(f"{' '.join(req.verb.split('-'))} needs NAME FILE")
    if not path.startswith("/"):
        raise UsageError("FILE must be an absolute path (the kvmgate command makes it one)")
    return path


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def add(req: Request, who: Caller, paths: Paths) -> int:
    name = library.check_name(req.name or "")
    path = _file(req)
    policy = config.load(paths)
    directory = library.ensure(paths)
    if os.path.lexists(os.path.join(directory, f"{name}.json")):
        raise UsageError(f"the library already has an image named {name}")
    from kvmgate.host.accounts import ensure_system_user

    ensure_system_user(IMAGE_USER)
    pw = pwd.getpwnam(IMAGE_USER)
    worker = imports.Worker(pw.pw_uid, pw.pw_gid)
    src = imports.open_source(path, req.flag("--format"), policy.limits)
    fds = [src.fd]
    stage = library.stage(paths)
    moved = None
    try:
        staged = os.path.join(stage, "image.qcow2")
        if req.has("--move"):
            moved = _move(src, staged)
            out = src.fd
            imports.check(out, worker, policy.limits)
        else:
            copy = not worker.can_read(src.st)
            imports.need_space(directory, src.allocated * (2 if copy else 1), path)
            if copy:
                src = imports.stage_copy(src, os.path.join(stage, "source"), f"image {name}")
                fds.append(src.fd)
            out = imports.convert_to(src, staged, worker, policy.limits, f"image {name}")
            fds.append(out)
        rec = model.Record(
            name=name,
            id=secrets.token_hex(16),
            virtual_size=src.virtual_size,
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source=path[:1024],
            cloud_init=req.has("--cloud-init"),
        )
        with locks.alloc_lock(paths):
            library.publish(paths, rec, out, staged)
        moved = None
    except BaseException:
        if moved is not None:  # give the admin's file back as it was
            with contextlib.suppress(OSError):
                os.rename(staged, path)
                os.fchmod(src.fd, moved)
        raise
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(stage, ignore_errors=True)
    bytes_on_disk = os.stat(library.data_path(directory, rec.id)).st_blocks * 512
    audit.done(paths.audit_log, who, "admin image add", None, name, source=path, id=rec.id,
               virtual_size=rec.virtual_size, moved=req.has("--move"))  # fmt: skip
    print(
        f"added image {name}: {_gib(rec.virtual_size)} virtual, {_gib(bytes_on_disk)} on disk"
        + (", cloud-init" if rec.cloud_init else "")
    )
    return 0


def _move(src: imports.Source, staged: str) -> int:
    """--move: rename the admin's file into the library. Only a file nobody else
    can still write through another name or their ownership; returns its old mode."""
    if src.fmt != "qcow2":
        raise UsageError("--move takes a qcow2 file (a raw image is converted: leave out --move)")
    if src.st.st_uid != 0 or src.st.st_nlink != 1:
        raise FileRefused(
            f"{src.path}: --move takes only a root-owned file with one link (another user could still write it); "
            "leave out --move to copy it"
        )
    try:
        os.rename(src.path, staged)
    except OSError as err:
        if err.errno == 18:  # EXDEV
            raise FileRefused(
                f"{src.path}: on another filesystem than the library: leave out --move to copy it"
            ) from None
        raise
    if not os.path.samestat(os.fstat(src.fd), os.stat(staged, follow_symlinks=False)):
        os.rename(staged, src.path)
        raise FileRefused(f"{src.path}: changed while it was being moved")
    mode = stat.S_IMODE(src.st.st_mode)
    os.fchmod(src.fd, 0o444)
    return mode


def listing(req: Request, paths: Paths) -> int:
    rows: list[dict[str, Any]] = []
    for rec in library.every_record(paths):
        data = library.data_path(library.library(paths), rec.id)
        try:
            on_disk = os.stat(data).st_blocks * 512
        except FileNotFoundError:
            on_disk = 0
        rows.append({
            "name": rec.name,
            "path": data,
            "virtual_size": rec.virtual_size,
            "bytes": on_disk,
            "vms": library.users(paths, rec),
            "cloud_init": rec.cloud_init,
            "added": rec.added,
            "source": rec.source,
        })  # fmt: skip
    text = "".join(
        f"{r['name']:<24} {_gib(r['virtual_size']):>10} {_gib(r['bytes']):>10}  "
        f"{'cloud-init' if r['cloud_init'] else '-':<10}  {', '.join(r['vms']) or '-'}\n"
        for r in rows
    )
    if text and os.isatty(1):
        text = f"{'NAME':<24} {'VIRTUAL':>10} {'ON DISK':>10}  {'SEED':<10}  VMS\n" + text
    emit(rows, text or "no images in the library\n", req.as_json)
    return 0


def remove(req: Request, who: Caller, paths: Paths) -> int:
    name = library.check_name(req.name or "")
    with locks.alloc_lock(paths):
        rec = library.read(paths, name)
        using = library.users(paths, rec)
        if using:
            shown = ", ".join(using[:5]) + (f" and {len(using) - 5} more" if len(using) > 5 else "")
            raise WrongState(
                f"image {name} is the base of {shown}: delete those VMs first "
                "(admin delete --keep-disks keeps a standalone copy of a VM's disk)"
            )
        library.remove(paths, rec)
    audit.done(paths.audit_log, who, "admin image remove", None, name, id=rec.id)
    print(f"removed image {name}")
    return 0


def offered(req: Request, paths: Paths) -> int:
    rows: list[dict[str, Any]] = [
        {"name": r.name, "virtual_size": r.virtual_size, "cloud_init": r.cloud_init}
        for r in library.every_record(paths)
    ]
    text = "".join(
        f"{r['name']:<24} {_gib(r['virtual_size']):>10}  {'cloud-init' if r['cloud_init'] else ''}\n" for r in rows
    )
    emit(rows, text or "no images offered\n", req.as_json)
    return 0


def import_disk(req: Request, who: Caller, paths: Paths) -> int:
    from kvmgate.store.define import replace_disk

    path = _file(req)
    model.format_for(path, req.flag("--format"))  # a usage error before anything else
    policy = config.load(paths)
    vm = registry.resolve(paths, req.flag("--owner") or "", req.name or "")
    owner, name = vm.identity.owner, vm.identity.name
    pw = pwd.getpwnam(owner)
    with locks.vm_lock(paths, owner, name, locks.INTERNAL_WAIT):
        if jobs.running(vm) or registry.read_saved(vm) is not None:
            raise WrongState(f"{name} is running or hibernated: stop it (or discard its state) first")
        if os.path.lexists(vm.default_disk) and not req.has("--replace"):
            raise WrongState(f"{name} already has a disk ({registry.DEFAULT_DISK}): give --replace to replace it")
        worker = imports.Worker(pw.pw_uid, pw.pw_gid)
        src = imports.open_source(path, req.flag("--format"), policy.limits)
        fds = [src.fd]
        stage = vm.sub(f".import-{os.getpid()}")
        registry.mkdir_root(stage, 0o700)
        try:
            copy = not worker.can_read(src.st)
            imports.need_space(vm.vmdir, src.allocated * (2 if copy else 1), path)
            if copy:
                src = imports.stage_copy(src, os.path.join(stage, "source"), f"{name}")
                fds.append(src.fd)
            staged = os.path.join(stage, registry.DEFAULT_DISK)
            fds.append(imports.convert_to(src, staged, worker, policy.limits, name))
            replace_disk(vm, staged)
        finally:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(stage, ignore_errors=True)
    audit.done(paths.audit_log, who, "admin import", owner, name, source=path, virtual_size=src.virtual_size)
    print(f"{owner}/{name}: {registry.DEFAULT_DISK} imported from {path} ({_gib(src.virtual_size)})")
    return 0


def keys(req: Request, who: Caller, paths: Paths) -> int:
    """Which keys the seed of the VM's last start held; before any start, which
    keys the next one would take (read now, with the owner's rights)."""
    vm = target(req, who, paths)
    settings = registry.read_settings(vm)
    if not settings.cloud_init:
        raise WrongState(f"{vm.identity.name} gets no cloud-init seed (admin create --cloud-init on)")
    from kvmgate.host import library as seeds
    from kvmgate.store.files import read_small

    try:
        record = json.loads(read_small(vm.sub("log", seeds.KEYS_RECORD)))
        when = "the last start's seed holds"
    except FileNotFoundError:
        from kvmgate.host import keys as owner_keys
        from kvmgate.model.cloudinit import record as shown

        found, skipped = owner_keys.read(pwd.getpwnam(vm.identity.owner), config.load(paths).limits.keys_max_kib)
        record = shown(found, skipped)
        when = "not started yet; its first start's seed will hold"
    text = f"{vm.identity.name}: {when} {len(record['keys'])} key(s)\n"
    text += "".join(f"  {k['type']} {k['fingerprint']} {k['comment']} ({k['from']})\n" for k in record["keys"])
    text += "".join(f"  skipped {s['source']}: {s['reason']}\n" for s in record["skipped"])
    emit(record, text, req.as_json)
    return 0
