"""Defining and deleting VMs: shared by the admin's `admin create/delete` and a
user's self-service `create/delete` (which pass a template's values as typed
arguments). Everything that can refuse happens before the directory exists;
what is made is undone if a later step fails."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from typing import NamedTuple

from kvmgate.errors import PolicyError, UsageError, WrongState
from kvmgate.host import audit
from kvmgate.host.caller import Caller
from kvmgate.model import identity as ident
from kvmgate.model import qcow2
from kvmgate.model.settings import Settings
from kvmgate.ops.plan import owner_dir, plan_for
from kvmgate.paths import Paths
from kvmgate.store import config, define, jobs, locks, registry, runtime
from kvmgate.store.trees import remove_tree


class Network(NamedTuple):
    """What `--network`, `--forward` and `--wake` ask for (None: not given)."""

    networks: list[str] | None = None
    forwards: str | None = None
    wake: bool | None = None


def allocate(
    paths: Paths, vm: registry.VM, settings: Settings, net: Network, commit: Callable[[Settings], object]
) -> Settings:
    """Choose the VM's networks, ports and wake-up under the allocation lock, check
    that the result translates, then `commit` it (still under the lock) and load
    the host's rules. Any refusal happens before `commit`: nothing is half-built."""
    from kvmgate.host import network
    from kvmgate.model.policy.network import parse_forwards

    policy = config.load(paths)
    plan_for(vm, policy, [], "tcg", settings=settings)  # the options' own errors first
    with locks.alloc_lock(paths):
        settings = network.allocate_for(
            paths,
            policy.net,
            vm,
            settings,
            networks=net.networks,
            forwards=parse_forwards(net.forwards, policy.net.ports) if net.forwards is not None else None,
            wake=net.wake,
        )
        plan_for(vm, policy, [], "tcg", settings=settings)  # must translate before it is kept
        commit(settings)
    network.sync(paths, policy)
    return settings


def create(
    paths: Paths,
    who: Caller,
    identity: ident.Identity,
    settings: Settings,
    net: Network,
    image_name: str | None = None,
    size: int | None = None,
    audit_extra: dict[str, object] | None = None,
) -> registry.VM:
    """A new VM: `identity` (owner, name, canonical admin options), its settings,
    a default disk (an overlay of library image `image_name`, or an empty one of
    `size` bytes, or none)."""
    vm = registry.vm_for(paths, identity)
    rec = None
    if image_name is not None:
        from kvmgate.store import images

        if "-hda" in identity.tokens:
            raise PolicyError("--image", "the VM's first disk is the image's overlay: leave out -hda")
        rec = images.read(paths, image_name)
    image = None
    if rec is not None:
        from kvmgate.model.images import backing_name

        want = size or rec.virtual_size
        if want < rec.virtual_size:
            raise UsageError(f"--disk-size is smaller than image {rec.name} ({rec.virtual_size >> 20} MiB)")
        image = qcow2.empty_image(want, backing=backing_name(rec.id))
        settings = settings.with_(image=rec.name, image_id=rec.id)
    elif size:
        image = qcow2.empty_image(size)
    define.ensure_layout(paths)

    def commit(s: Settings) -> None:
        if rec is not None:  # under the allocation lock, as admin image remove: the image is still there
            from kvmgate.store import images

            if images.read(paths, rec.name).id != rec.id:
                raise WrongState(f"image {rec.name} was replaced meanwhile: try again")
        define.create(paths, identity, image, s)

    allocate(paths, vm, settings, net, commit)
    audit.done(paths.audit_log, who, "create" if audit_extra else "admin create", identity.owner, identity.name,
               options=list(identity.tokens), directory=vm.vmdir, image=image_name,
               **(audit_extra or {}))  # fmt: skip
    return vm


def owner_pw(owner: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise UsageError(f"no such user: {owner}") from None
    if pw.pw_uid == 0:
        raise UsageError("VMs never run as root: choose an ordinary user as owner")
    return pw


class Deleted(NamedTuple):
    kept: str | None
    complete: bool  # every file removed (else admin reap goes on)

    def said(self, what: str) -> str:
        return (
            f"deleted {what}"
            + (f"; disks kept in {self.kept}" if self.kept else "")
            + ("" if self.complete else "; the rest of its files are removed by kvmgate admin reap")
        )


def delete(paths: Paths, who: Caller, vm: registry.VM, keep_disks: bool, force: bool, verb: str) -> Deleted:
    """Under the VM's lock: end it (with `force`), unpublish it, keep its disks
    if asked (an overlay flattened first), and free its ports and addresses."""
    from kvmgate.host import network
    from kvmgate.ops import power

    owner, name = vm.identity.owner, vm.identity.name
    if jobs.active(vm) is not None:  # in a Slurm job on some node: a stop there ends it first
        raise WrongState(f"{name} runs in a Slurm job: stop it first (kvmgate stop {name} --force)")
    if runtime.is_running(vm):
        if not force:
            raise WrongState(f"{name} is running: stop it first, or delete it with --force")
        power.end_locked(paths, who, vm)
    elif registry.read_saved(vm) is not None and not force:
        raise WrongState(
            f"{name} is hibernated: deleting it loses its saved state; "
            "`kvmgate stop --discard` it first, or delete it with --force"
        )
    settings = registry.read_settings(vm)
    if keep_disks and settings.image_id and os.path.lexists(vm.default_disk):
        from kvmgate.ops.images import flatten

        flatten(paths, vm, settings.image_id)  # what is kept needs nothing from the library
    with locks.alloc_lock(paths):
        kept, trash = define.delete(paths, vm, keep_disks)
    from kvmgate.host import holds

    holds.release(paths, vm)  # its saved state went with its directory
    done = all([remove_tree(trash), remove_tree(vm.rundir), remove_tree(owner_dir(vm))])
    audit.done(paths.audit_log, who, verb, owner, name, kept=kept, files_removed=done)
    network.sync(paths, config.load(paths))  # its ports, MACs and addresses are free again
    audit.done(paths.audit_log, who, f"{verb}: network freed", owner, name)
    return Deleted(kept, done)
