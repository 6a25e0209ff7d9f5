"""Creating and deleting VM directories and their name links: `admin create`
and `admin delete` only, kept apart from the registry that every start reads."""

from __future__ import annotations

import os
import pwd
import shutil
import time

from kvmgate.errors import WrongState
from kvmgate.model import identity as ident
from kvmgate.model.qcow2 import EmptyImage
from kvmgate.model.settings import Settings
from kvmgate.paths import Paths
from kvmgate.store import locks
from kvmgate.store.files import fsync_dir, touch, write_atomic, write_image
from kvmgate.store.registry import DEFAULT_DISK, VM, mkdir_root, vm_for
from kvmgate.store.trees import remove_tree


def ensure_layout(paths: Paths) -> None:
    for path, mode in (
        (paths.state, 0o755),
        (paths.vms, 0o711),
        (paths.names, 0o700),
        (os.path.join(paths.state, "kept"), 0o711),
        (paths.run, 0o700),
        (paths.log, 0o700),
    ):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        mkdir_root(path, mode)


def create(
    paths: Paths, identity: ident.Identity, empty_image: EmptyImage | None, settings: Settings | None = None
) -> VM:
    """Build the VM directory under a temporary name, then publish it with one
    rename and one exclusive symlink: a failure leaves nothing behind."""
    pw = pwd.getpwnam(identity.owner)
    vm = vm_for(paths, identity)
    link_dir = os.path.join(paths.names, identity.owner)
    link = os.path.join(link_dir, identity.name)
    if os.path.lexists(link):
        raise WrongState(f"{identity.owner} already has a VM named {identity.name}")
    if os.path.lexists(vm.vmdir):
        raise WrongState(f"identity directory already exists: {vm.vmdir}")
    stage = os.path.join(paths.vms, f".new-{os.getpid()}-{time.monotonic_ns()}")
    mkdir_root(stage, 0o700)
    try:
        comps = identity.components()
        if len(comps) > 1:
            cur = os.path.join(stage, ident.CHAIN_DIR)
            mkdir_root(cur, 0o700)
            for c in comps[1:]:
                cur = os.path.join(cur, c)
                mkdir_root(cur, 0o700)
        mkdir_root(os.path.join(stage, "saved"), 0o700)
        mkdir_root(os.path.join(stage, "log"), 0o700)
        mkdir_root(os.path.join(stage, "disks"), 0o700)
        mkdir_root(os.path.join(stage, "tmp"), 0o700)
        if settings is not None:
            write_atomic(os.path.join(stage, "settings.json"), settings.to_json())
        if empty_image is not None:
            fd = os.open(
                os.path.join(stage, "disks", DEFAULT_DISK),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                write_image(fd, empty_image)
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
            finally:
                os.close(fd)
        # Ownership last: until here only root could touch anything inside.
        os.chown(os.path.join(stage, "disks"), pw.pw_uid, pw.pw_gid)
        os.chown(os.path.join(stage, "tmp"), pw.pw_uid, pw.pw_gid)
        os.chmod(stage, 0o711)
        os.rename(stage, vm.vmdir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        mkdir_root(link_dir, 0o700)
        touch(locks.lock_path(paths, identity.owner, identity.name))
        os.symlink("../../vms/" + comps[0], link)
    except BaseException:
        shutil.rmtree(vm.vmdir, ignore_errors=True)
        raise
    return vm


def write_settings(vm: VM, settings: Settings) -> None:
    """The admin's settings of an existing VM (a start only reads them: store.registry)."""
    # fsynced: after a power loss an empty file would free the VM's ports and addresses
    write_atomic(vm.sub("settings.json"), settings.to_json(), fsync=True)


def reidentify(paths: Paths, vm: VM, identity: ident.Identity) -> VM:
    """Give a stopped VM new QEMU options: its directory is renamed to the new
    identity (disks, settings, logs and saved snapshots go with it), its chain of
    name directories rebuilt, and its name link replaced in one rename. Under the
    VM's lock; the runtime directory of the old identity is the caller's to remove."""
    new = vm_for(paths, identity)
    if os.path.lexists(new.vmdir):
        raise WrongState(f"{identity.name} already has exactly these options")
    os.rename(vm.vmdir, new.vmdir)
    shutil.rmtree(os.path.join(new.vmdir, ident.CHAIN_DIR), ignore_errors=True)  # root's directories only
    comps = identity.components()
    if len(comps) > 1:
        cur = os.path.join(new.vmdir, ident.CHAIN_DIR)
        mkdir_root(cur, 0o700)
        for c in comps[1:]:
            cur = os.path.join(cur, c)
            mkdir_root(cur, 0o700)
    link = os.path.join(paths.names, identity.owner, identity.name)
    staged = f"{link}.new-{os.getpid()}"
    os.symlink("../../vms/" + comps[0], staged)
    os.rename(staged, link)
    fsync_dir(os.path.dirname(link))
    return new


TRASH = ".del-"  # vms/.del-*: deleted VMs whose files are still being removed


def delete(paths: Paths, vm: VM, keep_disks: bool) -> tuple[str | None, str]:
    """Unpublish the VM (its name link), keep its disks if asked, and move its
    directory aside (vms/.del-*). Returns (where the disks were kept, the moved
    directory). The caller removes that with `trees.remove_tree` once it let go
    of the allocation lock (the owner's disks/ can hold anything); what one call
    cannot remove, `finish_deletes` (`admin reap`) does."""
    os.unlink(os.path.join(paths.names, vm.identity.owner, vm.identity.name))
    kept = None
    if keep_disks:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        owner_dir = os.path.join(paths.state, "kept", vm.identity.owner)
        mkdir_root(owner_dir, 0o711)
        kept = os.path.join(owner_dir, f"{vm.identity.name}.{stamp}")
        os.rename(vm.sub("disks"), kept)
    trash = os.path.join(paths.vms, f"{TRASH}{os.getpid()}-{time.monotonic_ns()}")
    os.rename(vm.vmdir, trash)
    return kept, trash


def finish_deletes(paths: Paths) -> list[str]:
    """Go on removing what earlier deletes left (a relayed signal, a huge tree)."""
    finished = []
    try:
        names = sorted(n for n in os.listdir(paths.vms) if n.startswith(TRASH))
    except FileNotFoundError:
        return []
    for name in names:
        if remove_tree(os.path.join(paths.vms, name)):
            finished.append(name)
    return finished


def replace_disk(vm: VM, staged: str) -> None:
    """Put a finished disk (on the same filesystem) in place of the VM's default
    disk, under the VM's lock. A standalone disk ends any tie to a library image."""
    from kvmgate.store.registry import read_settings

    os.rename(staged, vm.default_disk)
    fsync_dir(vm.sub("disks"))
    settings = read_settings(vm)
    if settings.image_id is not None:
        write_settings(vm, settings.with_(image=None, image_id=None))
