"""kvmgate against the peers people would pick instead, on the same machine, in one run.

    sudo .venv/bin/python bench/peers.py [--runs N] [--mem-mib 256] [--dirty-mib 0]

The same guest (the test guest's kernel and initramfs, no network, TCG) three ways:
- libvirt 9 (`qemu:///system`, Debian's packages, installed here by the benchmark's
  own set-up, never by the tests), the domain with a static DAC seclabel so that
  its QEMU runs as the VM's owner too;
- kvmgate, the standard installation, the VM owned by the bench user;
- the raw baseline: a bare QEMU, QMP `migrate fd:` into a file + fsync, and
  `-incoming defer` + `migrate-incoming fd:` + `cont` back.

Measured, interleaved run by run: start (`virsh start` vs `kvmgate start`, until
the command returns with QEMU running), save (`virsh managedsave` vs `kvmgate
hibernate` vs raw migrate + fsync), restore (`virsh start` of the saved domain vs
`kvmgate start` of the hibernated VM vs raw incoming + cont) and the saved
state's size. With `--dirty-mib`, the guest first fills that much of its RAM with
random bytes (a tmpfs inside the guest), so that the data path decides.

libvirt runs without systemd here: the set-up starts virtlogd and libvirtd by
hand and stops them at the end; its default network is never started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import BOOT, GUEST, GUEST_BOOT_LINE, KVMGATE, USER, define, setup, sh
from hibernate import migrate_to_file, qmp, quit_qemu, raw_restore

VM = "benchpeer"
DOMAIN = "kgbenchpeer"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
LIBVIRT_PKGS = ["libvirt-daemon-system", "libvirt-clients", "libvirt-daemon-driver-qemu"]
SOCK = "/run/libvirt/libvirt-sock"


def libvirt_up() -> list[subprocess.Popen[bytes]]:
    """Install libvirt (Debian's) and start its daemons by hand if nothing runs them."""
    missing = [
        p
        for p in LIBVIRT_PKGS
        if sh("dpkg-query", "-W", "-f=${Status}", p, check=False).stdout.find("ok installed") < 0
    ]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env, capture_output=True)  # fmt: skip
    daemons: list[subprocess.Popen[bytes]] = []
    if not os.path.exists(SOCK) or sh(*VIRSH, "version", check=False).returncode:
        for d in ("virtlogd", "libvirtd"):
            daemons.append(subprocess.Popen([f"/usr/sbin/{d}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(300):
            if os.path.exists(SOCK) and sh(*VIRSH, "version", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("libvirtd did not come up")
    return daemons


def domain_xml(tmp: str, mem: int, uid: int, gid: int) -> str:
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{tmp}/vmlinuz</kernel>
    <initrd>{tmp}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <serial type='unix'><source mode='bind' path='{tmp}/console.sock'/></serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='yes'><label>+{uid}:+{gid}</label></seclabel>
</domain>
"""


def console(path: str, send: str, expect: str, timeout: float = 180) -> None:
    """Send a line to a serial console socket and wait for `expect` in its output."""
    import re

    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with s:
        s.settimeout(1)
        buf = b""
        if send:
            s.sendall(send.encode())
        while not re.search(expect.encode(), buf):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {expect!r} on {path}: {buf[-300:]!r}")
            try:
                buf += s.recv(65536)
            except TimeoutError:
                if send:
                    s.sendall(b"\n")


def fill_command(dirty: int) -> str:
    """Fill `dirty` MiB of the guest's RAM with random bytes, then say so."""
    return (f"mkdir -p /fill && mount -t tmpfs -o size={dirty + 16}m tmpfs /fill && "
            f"dd if=/dev/urandom of=/fill/x bs=1M count={dirty} 2>/dev/null; echo FILLED-$((40+2))\n")  # fmt: skip


def timed(*cmd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return (time.perf_counter() - t0) * 1000


async def raw_cycle(tmp: str, mem: int, dirty: int) -> tuple[float, float, int]:
    """Bare QEMU: boot, fill, migrate fd: + fsync (save), then incoming + cont (restore)."""
    from common import bare_argv

    qsock, con, path = f"{tmp}/raw-q.sock", f"{tmp}/raw-con.sock", f"{tmp}/raw.state"
    p = subprocess.Popen(bare_argv(qsock, "-serial", f"unix:{con},server=on,wait=off", mem=str(mem)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    c = await qmp(qsock)
    console(con, "", GUEST_BOOT_LINE)
    if dirty:
        console(con, fill_command(dirty), "FILLED-42")
    _, save = await migrate_to_file(c, path)
    size = os.path.getsize(path)
    await quit_qemu(c)
    p.wait()
    # the same devices as the saved VM: a serial port too
    restore = await raw_restore(tmp, path, f"unix:{tmp}/raw-con2.sock,server=on,wait=off", str(mem))
    os.unlink(path)
    return save, restore, size


def libvirt_cycle(tmp: str, dirty: int) -> tuple[float, float, float, int]:
    sh(*VIRSH, "destroy", DOMAIN, check=False)
    sh(*VIRSH, "managedsave-remove", DOMAIN, check=False)
    start = timed(*VIRSH, "start", DOMAIN)
    console(f"{tmp}/console.sock", "", GUEST_BOOT_LINE)
    if dirty:
        console(f"{tmp}/console.sock", fill_command(dirty), "FILLED-42")
    save = timed(*VIRSH, "managedsave", DOMAIN)
    size = os.path.getsize(f"/var/lib/libvirt/qemu/save/{DOMAIN}.save")
    restore = timed(*VIRSH, "start", DOMAIN)
    sh(*VIRSH, "destroy", DOMAIN)
    return start, save, restore, size


def kvmgate_cycle(dirty: int) -> tuple[float, float, float, int]:
    k = [KVMGATE]
    start = timed(*k, "start", VM, "--owner", USER)
    sh(*k, "console", VM, "--owner", USER, "--expect", GUEST_BOOT_LINE, "--timeout", "180")
    if dirty:
        r = subprocess.run([*k, "console", VM, "--owner", USER, "--expect", "FILLED-42", "--timeout", "600"],
                           input=fill_command(dirty), capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
    save = timed(*k, "hibernate", VM, "--owner", USER)
    state = Path(sh(*k, "status", VM, "--owner", USER, "--json").stdout.split('"directory": "', 1)[1].split('"')[0])
    size = os.path.getsize(state / "saved" / "state")
    restore = timed(*k, "start", VM, "--owner", USER)
    sh(*k, "stop", VM, "--owner", USER, "--force")
    return start, save, restore, size


def line(what: str, peer: str, p: list[float], k: list[float]) -> str:
    mp, mk = statistics.median(p), statistics.median(k)
    return f"{what:<10} {peer:<34} {mp:9.1f} ms   kvmgate {mk:9.1f} ms   {peer.split()[0]}/kvmgate {mp / mk:5.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--dirty-mib", type=int, default=0)
    args = ap.parse_args()
    setup()
    daemons = libvirt_up()
    sh(*VIRSH, "net-destroy", "default", check=False)
    sh(*VIRSH, "net-autostart", "default", "--disable", check=False)
    pw = pwd.getpwnam(USER)
    tmp = tempfile.mkdtemp(prefix="kgpeer-")
    os.chmod(tmp, 0o777)  # the domain's QEMU runs as the bench user and binds its console here
    try:
        for f in ("vmlinuz", "initrd.img"):  # libvirt relabels what the domain uses: its own copies
            shutil.copy(GUEST / f, Path(tmp, f))
        xml = Path(tmp, "domain.xml")
        # QEMU as the owner's uid, as kvmgate runs it; with libvirt's own group, as kvmgate's QEMU gets
        # kvmgate-qemu: libvirt keeps per-domain files under /var/lib/libvirt/qemu (0750 libvirt-qemu).
        import grp

        xml.write_text(domain_xml(tmp, args.mem_mib, pw.pw_uid, grp.getgrnam("libvirt-qemu").gr_gid))
        sh(*VIRSH, "destroy", DOMAIN, check=False)
        sh(*VIRSH, "undefine", DOMAIN, "--managed-save", check=False)
        sh(*VIRSH, "define", str(xml))
        define(VM, "-m", str(args.mem_mib), "-nographic", "-net", "none", *BOOT)
        rows: dict[str, list[float]] = {k: [] for k in
                                        ("lv_start", "lv_save", "lv_restore", "lv_size", "kg_start", "kg_save",
                                         "kg_restore", "kg_size", "raw_save", "raw_restore", "raw_size")}  # fmt: skip
        for i in range(args.runs):
            results = (
                (("lv_start", "lv_save", "lv_restore", "lv_size"), libvirt_cycle(tmp, args.dirty_mib)),
                (("kg_start", "kg_save", "kg_restore", "kg_size"), kvmgate_cycle(args.dirty_mib)),
                (("raw_save", "raw_restore", "raw_size"), asyncio.run(raw_cycle(tmp, args.mem_mib, args.dirty_mib))),
            )
            for keys, values in results:
                for key, value in zip(keys, values, strict=True):
                    rows[key].append(value)
            print(f"run {i + 1}/{args.runs} done", flush=True)
        m = {k: statistics.median(v) for k, v in rows.items()}
        print(f"## peers: -m {args.mem_mib}, {args.dirty_mib} MiB of guest RAM dirtied, {args.runs} runs, medians")
        print(line("start", "virsh start", rows["lv_start"], rows["kg_start"]))
        print(line("save", "virsh managedsave", rows["lv_save"], rows["kg_save"]))
        print(line("restore", "virsh start (managed save)", rows["lv_restore"], rows["kg_restore"]))
        print(line("save", "raw migrate fd: + fsync", rows["raw_save"], rows["kg_save"]))
        print(line("restore", "raw migrate-incoming fd: + cont", rows["raw_restore"], rows["kg_restore"]))
        print(f"saved state: libvirt {m['lv_size'] / 2**20:.1f} MiB, kvmgate {m['kg_size'] / 2**20:.1f} MiB, "
              f"raw stream {m['raw_size'] / 2**20:.1f} MiB")  # fmt: skip
    finally:
        sh(*VIRSH, "destroy", DOMAIN, check=False)
        sh(*VIRSH, "undefine", DOMAIN, "--managed-save", check=False)
        sh(KVMGATE, "stop", VM, "--owner", USER, "--force", check=False)
        sh(KVMGATE, "admin", "delete", VM, "--owner", USER, check=False)
        for d in daemons:
            d.terminate()
            d.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
