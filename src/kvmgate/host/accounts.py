"""The system accounts kvmgate makes: no home, no shell, no password."""

from __future__ import annotations

import pwd
import subprocess


def ensure_system_user(name: str) -> bool:
    """Create a system account with no home and no shell; True if it was created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
        )
        return True
