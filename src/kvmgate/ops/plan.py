"""From a VM and the policy to a QEMU plan: the only place the model is fed
facts from the host (the default disk, the owner's uid, the owner directory)."""

from __future__ import annotations

import os
import pwd

from kvmgate.errors import IdentityError, NoSuchVM, PermissionRefused, PolicyError
from kvmgate.model.hostnet import attachments, services_of
from kvmgate.model.policy.policy import Policy
from kvmgate.model.settings import Settings
from kvmgate.model.translate import Accel, Context, Plan, Seed, base_image, merge, translate
from kvmgate.store import registry


def owner_dir(vm: registry.VM) -> str:
    """RUN-display/<key>/: the owner's own directory (0700) for the sockets only
    they may open (the VNC socket). Its parent is root's and cannot be listed."""
    return os.path.join(os.path.dirname(vm.rundir) + "-display", vm.key)


def owner_pw(vm: registry.VM) -> pwd.struct_passwd:
    """The owner's account; a VM whose owner is gone does not exist for anyone."""
    try:
        pw = pwd.getpwnam(vm.identity.owner)
    except KeyError:
        raise NoSuchVM(vm.identity.name) from None
    if pw.pw_uid == 0:
        raise PermissionRefused("VMs never run as root: the owner must be an ordinary user")
    return pw


def plan_for(
    vm: registry.VM,
    policy: Policy,
    user_tokens: list[str] | tuple[str, ...],
    accel: Accel,
    *,
    paused: bool = False,
    incoming: bool = False,
    settings: Settings | None = None,
    machine: str | None = None,
    stop_on_write_error: bool = False,
) -> Plan:
    try:
        admin_opts = policy.parse(list(vm.identity.tokens), "admin")
    except PolicyError as err:
        raise IdentityError(f"{vm.identity.name}: the VM's identity fails validation ({err})") from None
    if settings is None:
        settings = registry.read_settings(vm)
    user_opts = policy.parse(list(user_tokens), "user", settings.user_options)
    # lexists, not exists: root never follows a link the owner may have planted in
    # disks/ (that would tell them whether any path exists). The disk is opened
    # later with the owner's own rights, which decides.
    default_disk = vm.default_disk if os.path.lexists(vm.default_disk) else None
    base = None
    if settings.image_id and default_disk:  # an overlay of a library image, in STATE/images
        base = base_image(os.path.join(os.path.dirname(os.path.dirname(vm.vmdir)), "images"), settings.image_id)
    seed = Seed(vm.identity.name, f"kvmgate-{vm.key}", vm.identity.owner) if settings.cloud_init else None
    ctx = Context(
        accel=accel,
        default_disk=default_disk,
        key=vm.key,
        paused=paused,
        incoming=incoming,
        forwards=settings.forwards,
        forward_bind=policy.net.ports.bind,
        nics=attachments(policy.net, settings, owner_pw(vm).pw_uid),
        vnc_socket=os.path.join(owner_dir(vm), "vnc.sock") if policy.net.vnc == "unix" else None,
        base_image=base,
        seed=seed,
        agent=settings.guest_agent,
        data_dirs=policy.qemu_data,
        machine=machine,
        stop_on_write_error=stop_on_write_error,
        cpu=policy.backend.cpu_model,  # a cluster's one CPU model: a saved state restores on any node
        owner_map=(vm.rundir, services_of(policy.net, settings)) if settings.owner_map else None,
    )
    return translate(merge(admin_opts, user_opts), ctx)
