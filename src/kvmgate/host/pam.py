"""Installing and removing kvmgate's lines in the host's PAM session stacks
(`kvmgate admin init --pam / --no-pam`), and establishing whose session a PAM
event belongs to.

Each service that counts as a logon gets two lines at the end of its own file,
one per event, with the service and the event as argv words:

    session optional pam_exec.so quiet type=open_session  START sshd open
    session optional pam_exec.so quiet type=close_session START sshd close

START is `kvmgate-pam-start`, a script for the static /bin/busybox shell: pam_exec
runs it as root with the PAM environment, which `pam_env user_readenv=1` fills
from the user's own ~/.pam_environment. In a dynamically linked program an
LD_PRELOAD, LD_LIBRARY_PATH or GLIBC_TUNABLES there would run the user's code as
root; a static executable has no dynamic loader to read them. It empties the
environment, keeping only PAM_USER, and starts the hook (kvmgate-pam). The line is
installed only if /bin/busybox is a static executable (busybox-static).

Nothing the hook acts on comes from its environment: pam_exec puts the PAM
environment (which `pam_env user_readenv=1` fills from the user's own
~/.pam_environment) in front of its PAM_* items, so PAM_USER, PAM_TYPE and
SUDO_UID there may be the user's own words. The session's user is the loginuid
of the process that called PAM (set by pam_loginuid earlier in the same stack,
and unchangeable by the user afterwards). Only sshd and login set it, so only
their sessions count; `su -l` and `runuser -l` keep the caller's loginuid and
are not logons (docs/logon.md).

Files are rewritten atomically with their modes kept; a backup of each is kept once.
"""

from __future__ import annotations

import os
import re

from kvmgate.errors import PermissionRefused
from kvmgate.paths import Paths
from kvmgate.store.files import write_atomic

PAM_DIR = "/etc/pam.d"
SERVICES = ("sshd", "login")  # the stacks that run pam_loginuid before their session modules
LEGACY_FILE = "common-session"  # where releases before the loginuid hook put one line for every service
MARK = "# kvmgate: thaw VMs at a user's first logon, freeze or hibernate them at the last logoff"
SERVICE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}\Z")
EVENTS = {"open": "open_session", "close": "close_session"}


STATIC_SHELL = "/bin/busybox"


def hook_path(paths: Paths) -> str:
    return os.path.join(os.path.dirname(paths.helper), "kvmgate-pam")


def start_path(paths: Paths) -> str:
    return os.path.join(os.path.dirname(paths.helper), "kvmgate-pam-start")


def lines_for(paths: Paths, service: str) -> list[str]:
    return [
        f"session optional pam_exec.so quiet type={kind} {start_path(paths)} {service} {event}"
        for event, kind in EVENTS.items()
    ]


def _ours(paths: Paths, line: str) -> bool:
    words = line.split()
    return line == MARK or ("pam_exec.so" in words and (hook_path(paths) in words or start_path(paths) in words))


def is_static(path: str) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP): no dynamic
    loader runs in it, so no LD_* variable has any effect."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # 64-bit little-endian only
                return False
            phoff = int.from_bytes(head[0x20:0x28], "little")
            phentsize = int.from_bytes(head[0x36:0x38], "little")
            phnum = int.from_bytes(head[0x38:0x3A], "little")
            if phentsize < 4 or phnum > 256:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    if len(table) != phentsize * phnum:
        return False
    return all(int.from_bytes(table[i : i + 4], "little") != PT_INTERP for i in range(0, len(table), phentsize))


PT_INTERP = 3


def install_pam(
    paths: Paths, pam_dir: str = PAM_DIR, services: tuple[str, ...] = SERVICES, shell: str = STATIC_SHELL
) -> str:
    if not is_static(shell):
        raise PermissionRefused(
            f"{shell} is not a static executable: the PAM hook needs one to run without the user's "
            "PAM environment (apt-get install busybox-static); on a host with logind, kvmgate-sessions.service "
            "takes logons from logind without any hook"
        )
    said = [_strip(paths, os.path.join(pam_dir, LEGACY_FILE), "the old common-session line")]
    for service in services:
        path = os.path.join(pam_dir, service)
        if not os.path.exists(path):
            said.append(f"{path} does not exist: {service} logins are not counted")
            continue
        with open(path) as f:
            text = f.read()
        wanted = lines_for(paths, service)
        if all(line in text.splitlines() for line in wanted):
            said.append(f"{path} already runs {start_path(paths)}")
            continue
        kept = [ln for ln in text.splitlines() if not _ours(paths, ln)]
        backup = path + ".kvmgate-backup"
        if not os.path.exists(backup):
            with open(backup, "w") as f:
                f.write(text)
        _replace(path, "\n".join([*kept, MARK, *wanted]) + "\n")
        said.append(f"{path} now runs {start_path(paths)} (backup: {backup}; undo: kvmgate admin init --no-pam)")
    return "\n".join(s for s in said if s)


def unlist(paths: Paths, services: tuple[str, ...], pam_dir: str = PAM_DIR) -> str:
    """Remove the hook from stacks that have it but are no longer wanted (the
    admin took `cockpit` out of logon_services): the hook itself never reads the
    policy, so a line left in place would go on counting those logons."""
    stale = [n for n in _files_with_hook(paths, pam_dir) if n not in services and n != LEGACY_FILE]
    return "\n".join(s for s in (_strip(paths, os.path.join(pam_dir, n), "") for n in stale) if s)


def uninstall_pam(paths: Paths, pam_dir: str = PAM_DIR) -> str:
    said = []
    for service in sorted({LEGACY_FILE, *SERVICES, *_files_with_hook(paths, pam_dir)}):
        said.append(_strip(paths, os.path.join(pam_dir, service), ""))
    return "\n".join(s for s in said if s) or f"no file in {pam_dir} runs {hook_path(paths)}"


def _files_with_hook(paths: Paths, pam_dir: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(pam_dir)):
        path = os.path.join(pam_dir, name)
        try:
            with open(path) as f:
                if hook_path(paths) in f.read():  # the start script's path begins with it too
                    out.append(name)
        except (OSError, UnicodeDecodeError):
            continue
    return out


def _strip(paths: Paths, path: str, what: str) -> str:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ""
    kept = [ln for ln in lines if not _ours(paths, ln)]
    if kept == lines:
        return ""
    _replace(path, "\n".join(kept) + "\n")
    return f"removed {what or hook_path(paths)} from {path}"


def _replace(path: str, text: str) -> None:
    write_atomic(path, text, os.stat(path).st_mode & 0o7777)  # keep the file's mode
