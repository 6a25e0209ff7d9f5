"""`-s` and `-p` (a gdb stub) once made QEMU bind a socket in a root-only directory
it could not write to (`-s`), or a TCP port on loopback that any local user could
open and take the guest over with (`-p`). Both are now one unix socket in the
owner's own directory: the owner debugs their guest, nobody else can connect."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from ..conftest import DEFAULT_POLICY, Kvmgate, as_user, boot_options

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", e.errno); sys.exit(0)
s.settimeout(10)
s.sendall(b"$?#3f")
data = b""
while b"#" not in data.lstrip(b"+"):
    data += s.recv(100)
print("reply", data.decode())
"""


@pytest.fixture
def debuggable(kg: Kvmgate) -> None:
    """The note lists -s and -p as unused; an admin who wants them moves them to the admin's list
    (the policy refuses to give them to users: they hand out a host resource)."""
    kg.write_policy(DEFAULT_POLICY + '[lists]\nadmin = ["-s", "-p"]\n')


def gdb_reply(user: str, path: str) -> str:
    return as_user(user, ["/usr/bin/python3", "-c", CLIENT, path], timeout=30).stdout.strip()


@pytest.mark.parametrize("option", [["-s"], ["-p", "23456"]])
def test_the_gdb_stub_is_the_owners_alone(
    kg: Kvmgate, alice: str, bob: str, debuggable: None, vm_name: str, cleanup_vms: list, guest: Path, option: list[str]
) -> None:
    kg.ok("admin", "create", vm_name, "--owner", alice, "--", *boot_options(guest), *option)
    cleanup_vms.append((alice, vm_name))
    debuggable = vm_name
    kg.ok("start", debuggable, "--paused", user=alice)
    info = json.loads(kg.ok("gdb", debuggable, "--json", user=alice).stdout)
    path = info["socket"]
    assert gdb_reply(alice, path).startswith("reply +$")  # the stub answers the owner (a stop reply)
    assert gdb_reply(bob, path) == "refused 13"  # EACCES: the directory is the owner's
    assert kg("gdb", debuggable, user=bob).returncode == 4
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    assert ":23456 " not in listening  # -p never opens a TCP port
    with socket.socket(socket.AF_INET) as s:
        assert s.connect_ex(("127.0.0.1", 23456)) != 0
