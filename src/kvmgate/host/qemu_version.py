"""Which QEMU the policy names: its version, probed once per binary and cached.

Why: a saved state records the QEMU that wrote it, and a restore must know
whether the QEMU it is about to start can load it (a newer QEMU loads an older
one's state with the old machine type; an older QEMU cannot load a newer one's).
The probe is `QEMU --version`, run as kvmgate's image account (never as root),
with no environment, bounded in time and output. Its answer is cached in the
root-only runtime directory, keyed by the binary's device, inode, size and
modification time: an upgraded or replaced binary is probed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import subprocess
import time

from kvmgate.errors import KvmgateError, WrongState
from kvmgate.paths import IMAGE_USER, Paths
from kvmgate.store.files import read_small, write_atomic

Version = tuple[int, int, int]
VERSION_LINE = re.compile(rb"QEMU emulator version ([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})", re.ASCII)
RECORDED = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})", re.ASCII)
PROBE_SECONDS = 10
OUTPUT_MAX = 4096


def parse(recorded: str) -> Version:
    """A version as recorded with a saved state ("10.0.2")."""
    m = RECORDED.fullmatch(recorded)
    if m is None:
        raise KvmgateError(f"the saved state's record names QEMU version {recorded[:20]!r}, which is not one")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def text(v: Version) -> str:
    return ".".join(str(n) for n in v)


def version(paths: Paths, binary: str) -> Version:
    """The version of `binary`, from the cache or a probe."""
    try:
        st = os.stat(binary)
    except OSError as err:
        raise KvmgateError(f"cannot tell the version of QEMU {binary}: {err.strerror}") from None
    key = [binary, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = os.path.join(paths.run, "qemu-version.json")
    try:
        data = json.loads(read_small(cache))
        if data.get("key") == key:
            found = data["version"]
            return int(found[0]), int(found[1]), int(found[2])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    found_version = _probe(binary)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs a probe
        write_atomic(cache, json.dumps({"key": key, "version": list(found_version)}))
    return found_version


def _probe(binary: str) -> Version:
    try:
        pw = pwd.getpwnam(IMAGE_USER)
    except KeyError:
        raise KvmgateError(
            f"cannot tell the version of QEMU: the account {IMAGE_USER} is missing (run `kvmgate admin init`)"
        ) from None

    def child() -> None:  # after fork, before exec: never as root
        from kvmgate.host import caller

        caller.drop_to(pw.pw_uid, pw.pw_gid)

    try:
        proc = subprocess.Popen(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            cwd="/",
            preexec_fn=child,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise KvmgateError(f"cannot tell the version of QEMU {binary}: {err}") from None
    assert proc.stdout is not None
    out, deadline = b"", time.monotonic() + PROBE_SECONDS
    try:  # at most OUTPUT_MAX bytes, within PROBE_SECONDS, whatever the binary does
        while len(out) < OUTPUT_MAX and (left := deadline - time.monotonic()) > 0:
            if not select.select([proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(proc.stdout.fileno(), OUTPUT_MAX - len(out))
            if not chunk:
                break
            out += chunk
    finally:
        proc.stdout.close()
        try:
            status = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
    m = VERSION_LINE.search(out)
    if status != 0 or m is None:
        raise KvmgateError(f"cannot tell the version of QEMU {binary}: `--version` said no version")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def refuse_newer(paths: Paths, binary: str, name: str, recorded: str) -> None:
    """A restore: a state from a newer QEMU than `binary` cannot be loaded, and is
    refused before anything starts. An older one's loads with its machine type."""
    now = version(paths, binary)
    if parse(recorded)[:2] > now[:2]:
        raise WrongState(
            f"{name} was hibernated under QEMU {recorded}, and this host's QEMU is {text(now)}, which cannot "
            f"load a newer QEMU's state: restore it where QEMU {recorded} runs, or boot it afresh with "
            f"`kvmgate stop {name} --discard`"
        )


def explain(err: KvmgateError, paths: Paths, name: str, recorded: str) -> KvmgateError:
    """A failed restore of a state another QEMU saved says so, and the way out."""
    from kvmgate.store import config

    try:
        now = version(paths, config.load(paths).qemu)
        if now[:2] == parse(recorded)[:2]:
            return err
    except KvmgateError:
        return err  # the restore's own error is the one to tell
    return type(err)(
        f"{err} (saved under QEMU {recorded}, restored under {text(now)}: "
        f"`kvmgate stop {name} --discard` boots it afresh)"
    )
