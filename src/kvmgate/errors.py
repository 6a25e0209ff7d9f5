"""One exception root; every refusal carries its exit code, mapped in one place.

Exit codes are a stable interface (scripts and the PAM hook depend on them):
0 ok, 1 internal error, 2 usage, 3 refused by policy or permission,
4 no such VM for this caller, 5 wrong state.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_SUCH_VM = 4
EXIT_WRONG_STATE = 5


class KvmgateError(Exception):
    """Base of every error kvmgate reports; `str()` is the one-line message."""

    exit_code = EXIT_INTERNAL


class UsageError(KvmgateError):
    exit_code = EXIT_USAGE


class PolicyError(KvmgateError):
    """An option or value outside the typed allowlist, or a bad policy file."""

    exit_code = EXIT_REFUSED

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}" if option else reason)


class PermissionRefused(KvmgateError):
    exit_code = EXIT_REFUSED


class NoSuchVM(KvmgateError):
    """Also raised for a VM that exists but is not the caller's: the two must look alike."""

    exit_code = EXIT_NO_SUCH_VM

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no such VM: {name}")


class WrongState(KvmgateError):
    exit_code = EXIT_WRONG_STATE


class IdentityError(KvmgateError):
    """A VM identity (directory name) that does not decode or validate."""

    exit_code = EXIT_REFUSED
