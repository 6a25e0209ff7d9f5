"""Read the admin's policy file, trusting it only if root alone can change it,
and resolve the accelerator."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from typing import Any

from kvmgate.errors import PolicyError
from kvmgate.model.policy.policy import Policy
from kvmgate.model.translate import Accel
from kvmgate.paths import Paths
from kvmgate.store.files import write_atomic

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


def _root_only(st: os.stat_result, what: str) -> None:
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise PolicyError("policy", f"{what} must be owned by root and not writable by others")


def load(paths: Paths) -> Policy:
    """The policy, validated. Parsing TOML costs the helper more start-up time
    than QEMU's own start (tomllib pulls in typing, datetime and more), so the
    parsed form is cached as JSON in the root-only runtime directory, keyed by the
    file's identity and change times; any edit invalidates it. The cached dict is
    validated exactly like a freshly parsed one."""
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
        stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        cache = os.path.join(paths.run, "policy.cache.json")
        data = _cached(cache, stamp)
        if data is None:
            import tomllib

            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise PolicyError("policy", f"{paths.policy}: {err}") from None
            policy = Policy.from_dict(data)  # never cache what does not validate
            _store(cache, stamp, data)
            return policy
    return Policy.from_dict(data)


def _cached(path: str, stamp: list[int]) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != 0 or st.st_mode & 0o077:
            return None
        try:
            entry = json.loads(f.read(1 << 20))
        except ValueError:
            return None
    if not isinstance(entry, dict) or entry.get("stamp") != stamp or not isinstance(entry.get("policy"), dict):
        return None
    policy: dict[str, Any] = entry["policy"]
    return policy


def _store(path: str, stamp: list[int], data: dict[str, Any]) -> None:
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        write_atomic(path, json.dumps({"stamp": stamp, "policy": data}))
    except (OSError, TypeError, ValueError):
        pass  # a cache that cannot be written only costs time


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
