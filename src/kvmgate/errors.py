"""One exception root; every error kvmgate reports lives here, with its exit code.

Exit codes are a stable interface (scripts, the PAM hook and gated depend on
them), decided only by the class of the exception:

    0 ok, 1 internal error, 2 usage, 3 refused by policy or permission,
    4 no such VM for this caller, 5 wrong state,
    6 done, but by force (e.g. `stop` had to kill after the timeout),
    7 `admin watch`: the watched VM died.

Errors from outside kvmgate (OSError, CalledProcessError, QEMU's QMP errors)
are translated into these at the boundary where their meaning is known; what
reaches the entry point untranslated is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_SUCH_VM = 4
EXIT_WRONG_STATE = 5
EXIT_FORCED = 6
EXIT_VM_DIED = 7


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


class FileRefused(KvmgateError):
    """A user-named file that cannot be used. Missing and unreadable look alike."""

    exit_code = EXIT_REFUSED


class QemuRefused(KvmgateError):
    """QEMU would not start the VM as configured (an image another VM holds, a
    -loadvm tag that is missing, a header QEMU rejects), told in the user's words."""

    exit_code = EXIT_REFUSED


class Qcow2Refused(FileRefused):
    """A qcow2 header kvmgate will not hand to QEMU (backing file, data file, ...)."""


class Exhausted(KvmgateError):
    """A pool (ports, addresses, MACs, taps) has no free value left: the admin's
    policy sizes the pool, so this is a refusal, not an internal error."""

    exit_code = EXIT_REFUSED


class NoSuchVM(KvmgateError):
    """Also raised for a VM that exists but is not the caller's: the two must look alike."""

    exit_code = EXIT_NO_SUCH_VM

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no such VM: {name}")


class WrongState(KvmgateError):
    exit_code = EXIT_WRONG_STATE


class Busy(WrongState):
    """Another operation holds the VM's lock longer than a caller will wait."""


class IdentityError(KvmgateError):
    """A VM identity (directory name) that does not decode or validate."""

    exit_code = EXIT_REFUSED


class QMPError(KvmgateError):
    """QEMU's monitor refused a command or went away. Internal unless a verb
    knows what the refusal means for the user and translates it."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class VMDied(KvmgateError):
    """`admin watch`: QEMU exited without kvmgate asking it to."""

    exit_code = EXIT_VM_DIED


def one_line(text: object) -> str:
    """A message is one printable line: a newline or escape sequence in a name the
    user chose is shown escaped, never interpreted by the reader's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))[:2000]
