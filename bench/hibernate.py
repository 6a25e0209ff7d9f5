"""Hibernate and restore vs QEMU's own migration to a file, in the same run.

Baseline: the same VM (test guest, -m 256, booted and idle) started by root as a
bare QEMU; QMP `stop`, `migrate-set-parameters max-bandwidth`, `getfd` of an
open file and `migrate fd:` until completed (qemu.qmp, the QEMU project's
client). kvmgate: `kvmgate hibernate` (pause, QEMU writes the state file
itself while the helper checksums it, fsync, rename, record, quit QEMU). Restore: `kvmgate start` of the
hibernated VM until the guest answers on its console, vs. the boot-free
baseline of `-incoming defer` + `migrate-incoming fd:` of the raw file.

    sudo .venv/bin/python bench/hibernate.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time

from qemu.qmp import QMPClient

from common import BOOT, GUEST_BOOT_LINE, KVMGATE, USER, bare_argv, define, report, select_qemu, setup, sh

VM = "benchhib"
MEM = ["-m", "256"]


async def qmp(sock: str) -> QMPClient:
    c = QMPClient("bench")
    for _ in range(500):
        try:
            await c.connect(sock)
            return c
        except Exception:
            await asyncio.sleep(0.01)
    raise RuntimeError("no QMP")


async def wait_migration(c: QMPClient) -> None:
    while (await c.execute("query-migrate")).get("status") not in ("completed", "failed"):
        await asyncio.sleep(0.01)


async def raw_save(tmp: str) -> tuple[float, float, str]:
    sock, path = os.path.join(tmp, "q.sock"), os.path.join(tmp, "raw.state")
    p = subprocess.Popen(bare_argv(sock, "-serial", "none"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = await qmp(sock)
    await asyncio.sleep(6)  # let the guest boot, as the kvmgate VM has
    dt, dt_sync = await migrate_to_file(c, path)
    await quit_qemu(c)
    p.wait()
    return dt, dt_sync, path


async def migrate_to_file(c: QMPClient, path: str) -> tuple[float, float]:
    """The raw baseline: stop, QMP `migrate fd:` into a file at full speed, fsync.
    Returns (ms until migrated, ms until durable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    await c.execute("stop")
    await c.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
    c.send_fd_scm(fd)
    await c.execute("getfd", {"fdname": "out"})
    await c.execute("migrate", {"uri": "fd:out"})
    await wait_migration(c)
    dt = time.perf_counter() - t0
    os.fsync(fd)  # kvmgate must make the state durable; the second baseline includes that
    dt_sync = time.perf_counter() - t0
    os.close(fd)
    return dt * 1000, dt_sync * 1000


async def raw_restore(tmp: str, path: str, serial: str = "none", mem: str = "256") -> float:
    """The raw baseline: `-incoming defer`, `migrate-incoming fd:` of the file, `cont`.
    `serial`: the saved VM's serial port (the devices must match). Returns ms."""
    sock = os.path.join(tmp, "q2.sock")
    t0 = time.perf_counter()
    p = subprocess.Popen(
        bare_argv(sock, "-serial", serial, "-incoming", "defer", mem=mem),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    c = await qmp(sock)
    fd = os.open(path, os.O_RDONLY)
    c.send_fd_scm(fd)
    await c.execute("getfd", {"fdname": "in"})
    await c.execute("migrate-incoming", {"uri": "fd:in"})
    await wait_migration(c)
    await c.execute("cont")
    dt = time.perf_counter() - t0
    os.close(fd)
    await quit_qemu(c)
    p.wait()
    return dt * 1000


async def quit_qemu(c: QMPClient) -> None:
    await c.execute("quit")
    with contextlib.suppress(EOFError, ConnectionError):
        await c.disconnect()


def timed(*cmd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qemu", default="system", help="system (the host's QEMU) or 10.0 (scripts/fetch-qemu10.sh)")
    args = ap.parse_args()
    setup()
    print(f"# {select_qemu(args.qemu)}")
    define(VM, *MEM, "-nographic", "-net", "none", *BOOT)
    k = [KVMGATE]
    raw_s, raw_sync, raw_r, hib, res, answer = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            s, s_sync, path = asyncio.run(raw_save(tmp))
            raw_s.append(s)
            raw_sync.append(s_sync)
            raw_r.append(asyncio.run(raw_restore(tmp, path)))
            sh(*k, "start", VM, "--owner", USER)
            sh(*k, "console", VM, "--owner", USER, "--expect", GUEST_BOOT_LINE, "--timeout", "120")
            hib.append(timed(*k, "hibernate", VM, "--owner", USER))
            t0 = time.perf_counter()
            sh(*k, "start", VM, "--owner", USER)
            res.append((time.perf_counter() - t0) * 1000)
            r = subprocess.run(
                [*k, "console", VM, "--owner", USER, "--expect", "answer-42", "--timeout", "30"],
                input="echo answer-$((6*7))\n",
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr
            answer.append((time.perf_counter() - t0) * 1000)
            sh(*k, "stop", VM, "--owner", USER, "--force")
    print(report("hibernate (256 MiB guest): raw QMP migrate fd: vs kvmgate hibernate", raw_s, hib))
    print(report("hibernate: raw QMP migrate fd: + fsync vs kvmgate hibernate", raw_sync, hib))
    print(report("restore: raw migrate-incoming fd: + cont vs kvmgate start of a hibernated VM", raw_r, res))
    print(f"restore until the guest answers on its console: median {statistics.median(answer):.0f} ms (target 500 ms)")


if __name__ == "__main__":
    main()
