"""Hibernate (save the whole VM to its directory, then end QEMU) and restore.

QEMU writes and reads the state file itself through a descriptor the helper
passes with `getfd` (the sandbox forbids `migrate exec:`), at full speed, with
`max-bandwidth` raised. Guarantees:
- the state is written to `saved/state.tmp`, fsynced and checksummed (CRC-32: see _Hasher),
  then renamed, and only then is `saved/state.json` (time, size, checksum, how
  to restart) written the same way: a state without its record is never used;
- if saving fails (disk full, the helper killed), QEMU stays where it was:
  paused if it was paused, running again if it was running; nothing is deleted;
- a restore starts QEMU with its vCPUs stopped, checks size and checksum of the
  file while QEMU loads it, lets the vCPUs run only if both agree, and deletes
  the state only after that; a failed restore leaves the state in place and
  says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import zlib
from typing import Any

from kvmgate.errors import KvmgateError
from kvmgate.host.qmp import QMP, QMPError
from kvmgate.store import critical, registry
from kvmgate.store.files import fsync_dir, write_atomic
from kvmgate.store.registry import META, STATE, Saved

DISCARDED = STATE + ".discarded"  # a restored state whose blocks are being freed (discard)
BANDWIDTH = 64 << 30  # bytes/s: QEMU's 128 MiB/s default makes saving several times slower
CHUNK = 1 << 20
RECORD_VERSION = 3  # saved/state.json: 1 had `sha256`, 2 has `checksum`, 3 `qemu` and `machine`
CHECKSUM = "crc32"  # what new saved states are checked with (_Hasher)


def _tell(text: str) -> None:
    """Progress on the caller's terminal. This runs under the VM's lock: it goes
    through host.output, whose writes never wait on the caller."""
    if os.isatty(2):
        sys.stderr.write(text)


def _progress(done: int, what: str) -> None:
    _tell(f"\r{what}: {done >> 20} MiB")


class _Hasher:
    """The checksum of a file that QEMU is still writing (or reading): it sums what
    is there so far, so checking costs almost nothing after the migration ends.

    New states get a CRC-32 (zlib's, about 7 GB/s here); states recorded with a
    SHA-256 (version 1) are checked with it. The check is there for storage that
    lost or bent bytes, not for an adversary: only root can write the state once
    QEMU has quit, and a QEMU that wrote into it first could only change its own
    owner's VM, which it runs already. A SHA-256 (0.5 s per GiB here) would
    double a restore's time."""

    def __init__(self, fd: int, algorithm: str = CHECKSUM) -> None:
        self.fd, self.algorithm, self.size = fd, algorithm, 0
        self.crc = 0
        self.h: Any = None
        if algorithm == "sha256":
            import hashlib  # version 1 records only

            self.h = hashlib.sha256()
        elif algorithm != "crc32":
            name = algorithm[:20]
            raise KvmgateError(f"restore failed: its record names an unknown checksum {name!r}; the state was kept")

    def catch_up(self, limit: int | None = None) -> None:
        end = os.fstat(self.fd).st_size if limit is None else limit
        while self.size < end:
            chunk = os.pread(self.fd, min(CHUNK, end - self.size), self.size)
            if not chunk:
                break
            if self.h is None:
                self.crc = zlib.crc32(chunk, self.crc)
            else:
                self.h.update(chunk)
            self.size += len(chunk)

    def result(self) -> tuple[int, str]:
        self.catch_up()
        digest = f"{self.crc:08x}" if self.h is None else self.h.hexdigest()
        return self.size, f"{self.algorithm}:{digest}"


class _Mover:
    """A pipe QEMU writes the state into, and a thread that splices it into the
    state file (through its own descriptor) until QEMU closes its end, at the
    migration's end or when told to (`stop`)."""

    def __init__(self, out: int) -> None:
        self.read, self.write = os.pipe2(os.O_CLOEXEC)
        try:
            self.out = os.dup(out)
        except OSError:
            os.close(self.read)
            os.close(self.write)
            raise
        self.error: OSError | None = None
        self.thread: Any = None
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(self.write, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups

    def start(self) -> None:
        import threading

        os.close(self.write)
        self.write = -1
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while os.splice(self.read, self.out, 1 << 20):
                pass
        except OSError as err:
            self.error = err
        finally:
            os.close(self.read)
            os.close(self.out)

    def finish(self, timeout: float) -> None:
        """Wait for the whole stream (QEMU closed its end)."""
        if self.thread is not None:
            self.thread.join(timeout)
        if self.thread is None or self.thread.is_alive() or self.error is not None:
            raise KvmgateError(f"saving failed: the state could not be written ({self.error or 'timed out'})")

    def stop(self, q: QMP) -> None:
        """After a failure: QEMU lets go of its end, and the thread ends before the
        caller closes or removes the file."""
        if self.thread is None:
            for fd in (self.read, self.write, self.out):
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        with contextlib.suppress(OSError, QMPError):
            q.execute("closefd", {"fdname": "kgmig"})
        self.thread.join(30)


def _migration_error(q: QMP, status: str) -> str:
    with contextlib.suppress(OSError, QMPError):
        desc = q.execute("query-migrate").get("error-desc")
        if desc:
            return str(desc)
    return f"migration {status}"


def _run_migration(q: QMP, deadline: float, hasher: _Hasher, settled: bool) -> str:
    """Wait for the migration, hashing the file as it goes (everything, when the file
    is already complete: a restore; only what is written so far: a save) and
    showing progress on a terminal.

    A restore checks the whole file first, while QEMU loads it: QEMU 7.2 loads an
    incoming stream in its main loop and answers no QMP command until it is done,
    so asking first would serialise the two."""
    if settled:
        end = os.fstat(hasher.fd).st_size
        while hasher.size < end and time.monotonic() < deadline:
            before = hasher.size
            hasher.catch_up(min(end, hasher.size + (64 << 20)))
            if hasher.size == before:  # shorter than it was: the size check refuses it
                break
            _progress(hasher.size, "checking")
    while time.monotonic() < deadline:
        info = q.execute("query-migrate")
        status = str(info.get("status", "none"))
        if status in ("completed", "failed", "cancelled"):
            return status
        _progress(int(info.get("ram", {}).get("transferred", 0)), "transferring")
        before = hasher.size
        if not settled:
            hasher.catch_up(max(0, os.fstat(hasher.fd).st_size - CHUNK))
        if hasher.size == before:
            time.sleep(0.005)
    return "timeout"


def _made_by(q: QMP) -> tuple[str, str]:
    """The running QEMU's version and versioned machine type (`pc-i440fx-7.2`,
    not the `pc` alias, which moves with each release): what a later QEMU needs
    to load the state (ops.lifecycle)."""
    from kvmgate.host.qemu_version import RECORDED
    from kvmgate.model.translate import VERSIONED_MACHINE

    try:
        v = q.execute("query-version")["qemu"]
        version = f"{int(v['major'])}.{int(v['minor'])}.{int(v['micro'])}"
        kind = str(q.execute("qom-get", {"path": "/machine", "property": "type"})).removesuffix("-machine")
    except (KeyError, TypeError, ValueError):
        raise KvmgateError("cannot hibernate: QEMU did not say its version and machine type") from None
    # What QEMU says is what the guest's QEMU says: only the shapes a restore takes are recorded,
    # checked before anything is paused (a machine type without a version could not be restored).
    if not RECORDED.fullmatch(version) or not VERSIONED_MACHINE.fullmatch(kind):
        raise KvmgateError(f"cannot hibernate: QEMU's machine type {kind[:40]!r} has no version a restore can ask for")
    return version, kind


def save(vm: registry.VM, options: list[str], timeout: float = 3600, through_pipe: bool = False) -> Saved:
    """Save the running or paused VM into saved/, then quit QEMU. `through_pipe`:
    QEMU runs under a file size limit (a disk quota's, `ops.quota`) that would cut
    the state short, so it writes into a pipe and the helper moves the stream
    into the file (splice: no copy through user space)."""
    saved_dir = vm.sub("saved")
    tmp = os.path.join(saved_dir, STATE + ".tmp")
    for leftover in (tmp, os.path.join(saved_dir, DISCARDED)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    was_running = False
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=30) as q:
            was_running = q.execute("query-status").get("status") == "running"
            qemu, machine = _made_by(q)
            if was_running:
                q.execute("stop")
            mover = _Mover(out) if through_pipe else None
            try:
                q.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
                q.execute("getfd", {"fdname": "kgmig"}, fds=[mover.write if mover else out])
                if mover:
                    mover.start()  # QEMU holds its own write end from here
                q.execute("migrate", {"uri": "fd:kgmig"})
                hasher = _Hasher(out)
                status = _run_migration(q, time.monotonic() + timeout, hasher, settled=False)
                if status != "completed":
                    raise KvmgateError(f"saving failed: {_migration_error(q, status)}")
                if mover:
                    mover.finish(30)
                os.fsync(out)
                size, digest = hasher.result()
            except BaseException as err:
                with contextlib.suppress(OSError, QMPError):
                    q.execute("migrate_cancel")
                if mover:
                    mover.stop(q)
                if was_running:
                    with contextlib.suppress(OSError, QMPError):
                        q.execute("cont")
                now = "running again" if was_running else "still paused"
                if isinstance(err, KvmgateError):
                    raise KvmgateError(f"{err}; the VM is {now}, nothing was lost") from None
                raise
            os.rename(tmp, os.path.join(saved_dir, STATE))
            saved = Saved(time.time(), size, digest, options, was_running, qemu, machine)
            record = json.dumps({"version": RECORD_VERSION, **saved._asdict()})
            write_atomic(os.path.join(saved_dir, META), record, fsync=True)
            critical.pause("hibernate:saved")  # tests: a signal here must not lose the state
            with contextlib.suppress(OSError, QMPError):
                q.execute("quit")
    except (OSError, QMPError) as err:
        raise KvmgateError(f"saving failed: {err}") from None
    finally:
        os.close(out)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _tell("\n")
    return saved


def restore(vm: registry.VM, saved: Saved, timeout: float = 3600) -> None:
    """Let the QEMU started with `-incoming defer -S` load the saved state while the
    helper checks it; run the vCPUs (if they ran when saved) only if it is intact."""
    src = os.open(vm.sub("saved", STATE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        hasher = _Hasher(src, saved.checksum.partition(":")[0])  # checked while QEMU loads it; vCPUs stopped (-S)
    except BaseException:
        os.close(src)
        raise
    try:
        with QMP(os.path.join(vm.rundir, "qmp.sock"), timeout=30) as q:
            try:
                q.execute("getfd", {"fdname": "kgmig"}, fds=[src])
                q.execute("migrate-incoming", {"uri": "fd:kgmig"})
                status = _run_migration(q, time.monotonic() + timeout, hasher, settled=True)
                failure = None if status == "completed" else _migration_error(q, status)
            except (OSError, QMPError) as err:  # QEMU exits when an incoming migration fails
                failure = str(err)
            if hasher.result() != (saved.size, saved.checksum):
                raise KvmgateError("restore failed: the saved state is corrupt (size or checksum differs); it was kept")
            if failure is not None:
                raise KvmgateError(f"restore failed: {failure}; the saved state was kept")
            if saved.was_running:
                q.execute("cont")
    except (OSError, QMPError) as err:
        raise KvmgateError(f"restore failed: {err}; the saved state was kept") from None
    finally:
        os.close(src)
        _tell("\n")


def resumed(vm: registry.VM, saved: Saved) -> None:
    """After a restore: the VM runs its restored state, so the state is expendable,
    and the guest's clock is set. Nothing here may end the VM (its state would be
    lost with it): each step that fails says so and the next goes on."""
    try:
        discard(vm, wait=False)
    except OSError as err:
        sys.stderr.write(f"kvmgate: warning: the restored state could not be removed ({err.strerror}); "
                         f"remove {vm.sub('saved')} by hand before {vm.identity.name} stops\n")  # fmt: skip
    if saved.was_running:  # its clock stood still while it slept: the guest agent, if any, sets it
        from kvmgate.host import agent

        agent.set_time(vm.rundir)


def discard(vm: registry.VM, wait: bool = True) -> None:
    """Remove the saved state: its record first, so that a crash half-way leaves a
    state without a record, which no start takes for a hibernated VM. With
    `wait=False` (a restore), the state is renamed aside and its blocks are freed
    by a detached child, after the caller has its VM back: freeing a state of
    gigabytes takes the kernel a fifth of a second per GiB. A leftover (the child
    killed) is removed by the next hibernate of the VM."""
    saved = vm.sub("saved")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(saved, META))
    if wait:
        for name in (STATE, DISCARDED):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(saved, name))
        fsync_dir(saved)
        return
    with contextlib.suppress(FileNotFoundError):
        os.rename(os.path.join(saved, STATE), os.path.join(saved, DISCARDED))
    fsync_dir(saved)
    from kvmgate.host.detach import detach

    def free() -> None:
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the caller's output pipes and the locks: let go at once
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(saved, DISCARDED))

    try:
        detach(free)
    except OSError:  # no child to be had: free it now
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(saved, DISCARDED))
