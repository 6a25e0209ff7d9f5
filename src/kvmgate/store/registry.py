"""The VM registry on disk: identity directories, name symlinks, settings.

Layout (see docs/layout.md):

    STATE/vms/                 root 0711   nobody may list it
    STATE/vms/<identity>/      root 0711   created and renamed by root only
        id/<chunk>/...         root 0700   continuation of a long identity
        disks/                 OWNER 0700  the owner's images (disk0.qcow2)
        saved/                 root 0700   saved states
        log/                   root 0700   qemu.log, console.log
        tmp/                   OWNER 0700  QEMU's private TMPDIR
    STATE/names/<owner>/<name> -> ../../vms/<identity>    (root 0700 dirs)
    STATE/locks/vm-<hash>      root 0600   the VM operation locks (store.locks)
    RUN/<key>/                 root 0700   runtime state (store.runtime)

The symlink is only a name: the identity it points at is decoded and must
name the same owner and name, so a swapped link cannot borrow another VM.
"""

from __future__ import annotations

import json
import os
import stat
from typing import NamedTuple

from kvmgate.errors import IdentityError, KvmgateError, NoSuchVM, UsageError
from kvmgate.model import identity as ident
from kvmgate.model import settings as settings_model
from kvmgate.model.settings import Settings
from kvmgate.paths import Paths
from kvmgate.store.files import read_small

DEFAULT_DISK = "disk0.qcow2"


class VM(NamedTuple):
    identity: ident.Identity
    vmdir: str
    rundir: str

    @property
    def key(self) -> str:
        return self.identity.key

    def sub(self, *parts: str) -> str:
        return os.path.join(self.vmdir, *parts)

    @property
    def default_disk(self) -> str:
        return self.sub("disks", DEFAULT_DISK)


def mkdir_root(path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise KvmgateError(f"{path} exists and is not a directory") from None
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def _check_root_dir(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise IdentityError(f"{path} is not a root-owned directory")


def vm_for(paths: Paths, identity: ident.Identity) -> VM:
    return VM(identity, os.path.join(paths.vms, identity.components()[0]), os.path.join(paths.run, identity.key))


def _read_chain(vmdir: str) -> list[str]:
    chain: list[str] = []
    cur = os.path.join(vmdir, ident.CHAIN_DIR)
    while True:
        try:
            entries = os.listdir(cur)
        except FileNotFoundError:
            return chain
        if not entries:
            return chain
        if len(entries) != 1:
            raise IdentityError("identity chain is ambiguous")
        cur = os.path.join(cur, entries[0])
        _check_root_dir(cur)
        chain.append(entries[0])


def decode_dir(paths: Paths, dirname: str) -> VM:
    """Decode a VM directory's identity from its name (and chain) alone."""
    vmdir = os.path.join(paths.vms, dirname)
    _check_root_dir(vmdir)
    chain = _read_chain(vmdir) if dirname.startswith(ident.LONG) else []
    identity = ident.decode([dirname, *chain])
    return VM(identity, vmdir, os.path.join(paths.run, identity.key))


def resolve(paths: Paths, owner: str, name: str) -> VM:
    """The VM `name` of `owner`. Missing, foreign and tampered all raise NoSuchVM
    for the caller; a tampered identity is also logged by the caller as refused."""
    try:
        ident.check_name(name)
        ident.check_owner(owner)
    except UsageError:
        raise NoSuchVM(name) from None
    link = os.path.join(paths.names, owner, name)
    try:
        target = os.readlink(link)
    except OSError:
        raise NoSuchVM(name) from None
    prefix = "../../vms/"
    dirname = target[len(prefix) :]
    if not target.startswith(prefix) or "/" in dirname or dirname in ("", ".", ".."):
        raise IdentityError(f"name link {owner}/{name} is malformed")
    try:
        vm = decode_dir(paths, dirname)
    except FileNotFoundError:
        raise NoSuchVM(name) from None
    if (vm.identity.owner, vm.identity.name) != (owner, name):
        raise IdentityError(f"name link {owner}/{name} points at another VM's identity")
    return vm


def read_settings(vm: VM) -> Settings:
    """The admin's settings that are not QEMU options (settings.json, root-only)."""
    try:
        text = read_small(vm.sub("settings.json"))
    except FileNotFoundError:
        return Settings()
    try:
        return settings_model.parse(text)
    except settings_model.CorruptSettings as err:
        raise KvmgateError(f"{vm.identity.name}: corrupt settings ({err})") from None


# ------------------------------------------------------------------ saved state

STATE = "state"  # saved/state: the migration stream QEMU wrote (host.migrate)
META = "state.json"  # saved/state.json: its record, written only after the stream is complete


class Saved(NamedTuple):
    """A saved state's record (`saved/state.json`). `checksum` is "crc32:<hex>"
    (records from version 2 on) or "sha256:<hex>" (version 1, whose key was `sha256`);
    `qemu` and `machine` are recorded from version 3 on."""

    saved_at: float
    size: int
    checksum: str
    options: list[str]
    was_running: bool
    qemu: str = "7.2.0"  # the QEMU that wrote it (version 3; before: 7.2, docs/policy.md)
    machine: str = "7.2"  # its versioned machine type ("pc-i440fx-7.2"; before version 3: 7.2 of its family)


def read_saved(vm: VM) -> Saved | None:
    """The saved state's record, if the state is complete (its size matches): the
    one fact every start needs about hibernation, without loading host.migrate."""
    try:
        data = json.loads(read_small(vm.sub("saved", META)))
        checksum = data["checksum"] if "checksum" in data else f"sha256:{data['sha256']}"  # version 1: sha256
        made_by = str(data.get("qemu", "7.2.0")), str(data.get("machine", "7.2"))  # before version 3: QEMU 7.2
        fields = (float(data["saved_at"]), int(data["size"]), str(checksum), [str(t) for t in data["options"]])
        saved = Saved(*fields, bool(data["was_running"]), *made_by)
        if os.stat(vm.sub("saved", STATE)).st_size != saved.size:
            return None
        return saved
    except (OSError, ValueError, KeyError, TypeError):
        return None
