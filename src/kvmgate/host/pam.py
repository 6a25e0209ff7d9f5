"""Installing and removing kvmgate's line in the host's PAM session stack
(`kvmgate admin init --pam / --no-pam`). The file is rewritten atomically with
its mode kept, and a backup of the original is kept once."""

from __future__ import annotations

import os

from kvmgate.paths import Paths
from kvmgate.store.files import write_atomic

PAM_FILE = "/etc/pam.d/common-session"
MARK = "# kvmgate: thaw VMs at a user's first logon, freeze or hibernate them at the last logoff"


def hook_path(paths: Paths) -> str:
    return os.path.join(os.path.dirname(paths.helper), "kvmgate-pam")


def install_pam(paths: Paths, pam_file: str = PAM_FILE) -> str:
    line = f"session optional pam_exec.so quiet {hook_path(paths)}"
    with open(pam_file) as f:
        text = f.read()
    if line in text.splitlines():
        return f"{pam_file} already runs {hook_path(paths)}"
    backup = pam_file + ".kvmgate-backup"
    if not os.path.exists(backup):
        with open(backup, "w") as f:
            f.write(text)
    _replace(pam_file, text.rstrip("\n") + f"\n{MARK}\n{line}\n")
    return f"{pam_file} now runs {hook_path(paths)} (backup: {backup}; undo: kvmgate admin init --no-pam)"


def uninstall_pam(paths: Paths, pam_file: str = PAM_FILE) -> str:
    line = f"session optional pam_exec.so quiet {hook_path(paths)}"
    with open(pam_file) as f:
        lines = f.read().splitlines()
    kept = []
    for i, ln in enumerate(lines):
        if ln == line or (ln == MARK and i + 1 < len(lines) and lines[i + 1] == line):
            continue
        kept.append(ln)
    if kept == lines:
        return f"{pam_file} does not run {hook_path(paths)}"
    _replace(pam_file, "\n".join(kept) + "\n")
    return f"removed {hook_path(paths)} from {pam_file}"


def _replace(path: str, text: str) -> None:
    write_atomic(path, text, os.stat(path).st_mode & 0o7777)  # keep the file's mode
