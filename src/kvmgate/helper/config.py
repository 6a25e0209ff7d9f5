"""Read the admin's policy file, trusting it only if root alone can change it,
and resolve the accelerator."""

from __future__ import annotations

import fcntl
import os
import stat
import tomllib

from ..errors import PolicyError
from ..paths import Paths
from ..policy.policy import Policy
from ..translate import Accel

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


def _root_only(st: os.stat_result, what: str) -> None:
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise PolicyError("policy", f"{what} must be owned by root and not writable by others")


def load(paths: Paths) -> Policy:
    try:
        fd = os.open(paths.policy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return Policy()
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError("policy", f"{paths.policy} is not a regular file")
        _root_only(st, paths.policy)
        _root_only(os.stat(paths.etc), paths.etc)
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise PolicyError("policy", f"{paths.policy}: {err}") from None
    return Policy.from_dict(data)


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def accel(policy: Policy) -> Accel:
    if policy.accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return "kvm" if policy.accel == "kvm" else "tcg"
