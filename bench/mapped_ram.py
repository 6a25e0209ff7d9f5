"""Is QEMU 10's `mapped-ram` migration worth using for hibernate? Raw QEMU only, in one run.

    sudo .venv/bin/python bench/mapped_ram.py [--runs N] [--mem-mib 1024] [--dirty-mib 900]

QEMU 10.0 (scripts/fetch-qemu10.sh), the test guest with most of its RAM filled
with random bytes, saved and restored three ways, interleaved run by run:
- the stream kvmgate uses: `migrate fd:` into a file, fsync; `migrate-incoming fd:`;
- `mapped-ram` (9.0+): every RAM page at a fixed offset of a `file:` target, fsync;
- `mapped-ram` with `multifd` (2 channels: this machine has 2 cores).
Save is stop until durable; restore is `-incoming defer` until `cont` returned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time

from qemu.qmp import QMPClient

from common import GUEST_BOOT_LINE, bare_argv, select_qemu
from hibernate import migrate_to_file, qmp, quit_qemu, raw_restore, wait_migration
from peers import console, fill_command

MODES = {"stream": [], "mapped-ram": ["mapped-ram"], "mapped-ram+multifd": ["mapped-ram", "multifd"]}


async def caps(c: QMPClient, names: list[str]) -> None:
    if names:
        await c.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": n, "state": True} for n in names]})  # fmt: skip
    if "multifd" in names:
        await c.execute("migrate-set-parameters", {"multifd-channels": 2})


async def save(tmp: str, mem: int, dirty: int, mode: str) -> tuple[float, str]:
    qsock, con, path = f"{tmp}/q.sock", f"{tmp}/con.sock", f"{tmp}/{mode}.state"
    p = subprocess.Popen(bare_argv(qsock, "-serial", f"unix:{con},server=on,wait=off", mem=str(mem)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    c = await qmp(qsock)
    console(con, "", GUEST_BOOT_LINE)
    console(con, fill_command(dirty), "FILLED-42")
    if mode == "stream":
        _, ms = await migrate_to_file(c, path)
    else:
        t0 = time.perf_counter()
        await c.execute("stop")
        await c.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
        await caps(c, MODES[mode])
        await c.execute("migrate", {"uri": f"file:{path}"})
        await wait_migration(c)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        ms = (time.perf_counter() - t0) * 1000
    await quit_qemu(c)
    p.wait()
    return ms, path


async def restore(tmp: str, path: str, mem: int, mode: str) -> float:
    if mode == "stream":
        return await raw_restore(tmp, path, f"unix:{tmp}/con2.sock,server=on,wait=off", str(mem))
    sock = f"{tmp}/q2.sock"
    t0 = time.perf_counter()
    p = subprocess.Popen(bare_argv(sock, "-serial", f"unix:{tmp}/con2.sock,server=on,wait=off", "-incoming", "defer",
                                   mem=str(mem)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    c = await qmp(sock)
    await caps(c, MODES[mode])
    await c.execute("migrate-incoming", {"uri": f"file:{path}"})
    await wait_migration(c)
    await c.execute("cont")
    ms = (time.perf_counter() - t0) * 1000
    await quit_qemu(c)
    p.wait()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--dirty-mib", type=int, default=900)
    args = ap.parse_args()
    print(f"# {select_qemu('10.0')}")
    rows: dict[str, dict[str, list[float]]] = {m: {"save": [], "restore": [], "size": []} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for mode in MODES:
                ms, path = asyncio.run(save(tmp, args.mem_mib, args.dirty_mib, mode))
                rows[mode]["save"].append(ms)
                rows[mode]["size"].append(os.stat(path).st_blocks * 512 / 2**20)
                rows[mode]["restore"].append(asyncio.run(restore(tmp, path, args.mem_mib, mode)))
                os.unlink(path)
            print(f"run {i + 1}/{args.runs} done", flush=True)
    print(f"## QEMU 10.0, -m {args.mem_mib}, {args.dirty_mib} MiB dirtied, {args.runs} runs, medians")
    base = {k: statistics.median(v) for k, v in rows["stream"].items()}
    for mode, r in rows.items():
        m = {k: statistics.median(v) for k, v in r.items()}
        print(f"{mode:<20} save {m['save']:7.1f} ms ({m['save'] / base['save']:.2f}x)   "
              f"restore {m['restore']:7.1f} ms ({m['restore'] / base['restore']:.2f}x)   "
              f"on disk {m['size']:7.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
