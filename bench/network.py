"""Networks: what kvmgate's isolation costs, and what its forwarded ports cost.

1. Guest to service VM over the `services` bridge, as kvmgate builds it (user VM
   on an isolated port, nftables anti-spoofing rules), vs. the same two guests on
   the same bridge made plain (port not isolated, kvmgate's bridge table removed),
   interleaved in one run: HTTP download throughput (25 MiB from busybox httpd)
   and TCP connection latency (sequential HTTP requests), both timed inside the
   client guest.
2. A forwarded port: connection + request + full response from the host, as the
   VM's owner, through kvmgate's `--forward` (QEMU hostfwd behind the nftables
   owner rule) vs. the bare QEMU command with its own hostfwd, interleaved.

    sudo .venv/bin/python bench/network.py [--rounds N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pwd
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import BOOT, GUEST, KVMGATE, USER, bare_argv, setup, sh
from kvmgate.model.translate import SANDBOX

SVC, CLIENT, FWD = "benchsvc", "benchcli", "benchfwd"
SVC_OWNER = "kvmgate-svc"
SIZE_BLOCKS = 400  # 64 KiB blocks: 25 MiB
CONNECTIONS = 30
_seq = itertools.count(5000)


def guest(owner: str, name: str, script: str, timeout: int = 300) -> str:
    n = next(_seq)
    line = f"echo KGB-$(({n}+1)); {script}; echo KGE-$(({n}+2))\n"
    r = subprocess.run(
        [KVMGATE, "console", name, "--owner", owner, "--expect", f"KGE-{n + 2}", "--timeout", str(timeout)],
        input=line,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr + r.stdout[-500:]
    return r.stdout[r.stdout.rfind(f"KGB-{n + 1}") :]


def recreate(name: str, *args: str, service: bool = False) -> dict:
    owner = SVC_OWNER if service else USER
    sh(KVMGATE, "stop", name, "--owner", owner, "--force", check=False)
    sh(KVMGATE, "admin", "delete", name, "--owner", owner, check=False)
    who = ["--service", "--no-autostart"] if service else ["--owner", USER]
    sh(KVMGATE, "admin", "create", name, *who, *args)
    return json.loads(sh(KVMGATE, "admin", "show", name, "--owner", owner, "--json").stdout)


def boot(*flags: str) -> list[str]:
    return ["-m", "256", "-nographic", *BOOT[:-1], " ".join(["console=ttyS0 quiet", *flags])]


def measure_bridge(sip: str) -> tuple[float, float]:
    """(MiB/s, ms per connection), timed by the client guest's clock."""
    out = guest(
        USER,
        CLIENT,
        f"a=$(cut -d' ' -f1 /proc/uptime); printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | nc {sip} 80 | wc -c; "
        f"b=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {CONNECTIONS} ]; do "
        f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {sip} 80 >/dev/null; i=$((i+1)); done; "
        "c=$(cut -d' ' -f1 /proc/uptime); echo T $a $b $c",
    )
    got = int(re.findall(r"^\s*(\d+)\s*$", out, re.M)[0])
    assert got > SIZE_BLOCKS * 65536, out
    a, b, c = (float(x) for x in re.findall(r"T ([\d.]+) ([\d.]+) ([\d.]+)", out)[0])
    return got / (1 << 20) / (b - a), (c - b) * 1000 / CONNECTIONS


def plain(tap: str, on: bool) -> None:
    """Make the bridge plain (no isolation, no kvmgate bridge rules), or kvmgate's again."""
    if on:
        sh("bridge", "link", "set", "dev", tap, "isolated", "off")
        sh("nft", "delete", "table", "bridge", "kvmgate_kg")
    else:
        sh(KVMGATE, "admin", "net-up")
        sh("bridge", "link", "set", "dev", tap, "isolated", "on")


def bridge_bench(rounds: int) -> None:
    svc = recreate(SVC, "--network", "services", "--", *boot("kvmgate.httpd"), service=True)
    cli = recreate(CLIENT, "--network", "services", "--", *boot())
    sip, tap = svc["nics"][0]["ip"], cli["nics"][0]["tap"]
    for owner, name, ip in ((SVC_OWNER, SVC, sip), (USER, CLIENT, cli["nics"][0]["ip"])):
        sh(KVMGATE, "start", name, "--owner", owner)
        sh(KVMGATE, "console", name, "--owner", owner, "--expect", f"KVMGATE-GUEST-NET eth0 {ip}", "--timeout", "120")
    guest(SVC_OWNER, SVC, f"dd if=/dev/zero of=/www/big bs=65536 count={SIZE_BLOCKS} 2>/dev/null")
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    try:
        measure_bridge(sip)  # warm-up
        for _ in range(rounds):
            ours.append(measure_bridge(sip))
            plain(tap, True)
            try:
                base.append(measure_bridge(sip))
            finally:
                plain(tap, False)
    finally:
        for owner, name in ((SVC_OWNER, SVC), (USER, CLIENT)):
            sh(KVMGATE, "stop", name, "--owner", owner, "--force", check=False)
    tb, to = statistics.median(t for t, _ in base), statistics.median(t for t, _ in ours)
    lb, lo = statistics.median(c for _, c in base), statistics.median(c for _, c in ours)
    print("## guest -> service VM: plain bridge (baseline) vs kvmgate's services network")
    print(f"throughput: plain {tb:.1f} MiB/s, services {to:.1f} MiB/s, ratio {to / tb:.2f}x (n={rounds})")
    print(f"connection: plain {lb:.1f} ms, services {lo:.1f} ms, ratio {lb / lo:.2f}x (as speed; n={rounds})")


PROBE = """
import socket, sys, time, json
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for _ in range(n):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        while s.recv(65536):
            pass
    out.append((time.perf_counter() - t0) * 1000)
print(json.dumps(out))
"""


def fetch_as_owner(port: int, n: int) -> list[float]:
    pw = pwd.getpwnam(USER)
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(port), str(n)],
        capture_output=True,
        text=True,
        user=pw.pw_uid,
        group=pw.pw_gid,
        cwd="/",
        check=True,
    )
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_http(port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            fetch_as_owner(port, 1)
            return
        except subprocess.CalledProcessError:
            time.sleep(0.5)
    raise SystemExit(f"no HTTP on port {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def forward_bench(rounds: int, per_round: int) -> None:
    recreate(FWD, "--forward", "http", "--", *boot("kvmgate.httpd"))
    rows = json.loads(sh(KVMGATE, "ports", FWD, "--owner", USER, "--json").stdout)
    ours_port = rows[0]["port"]
    tmp = tempfile.mkdtemp()
    bares: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    # The bare command: the same kernel and command line (httpd on), QEMU's own hostfwd;
    # once as is, once with the -sandbox kvmgate always adds (it costs per system call).
    for label, extra in (("bare", []), ("bare+sandbox", ["-sandbox", SANDBOX])):
        port = free_port()
        argv = bare_argv(f"{tmp}/{len(bares)}.sock", "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80")
        argv[argv.index("-append") + 1] = "console=ttyS0 quiet kvmgate.httpd"
        bares[label] = (
            port,
            subprocess.Popen([*argv, "-device", "virtio-net-pci,netdev=n0", "-serial", "null", *extra]),
        )
    sh(KVMGATE, "start", FWD, "--owner", USER)
    times: dict[str, list[float]] = {"bare": [], "bare+sandbox": [], "kvmgate": []}
    ports = {label: port for label, (port, _) in bares.items()} | {"kvmgate": ours_port}
    try:
        for port in ports.values():
            wait_http(port)
        for _ in range(rounds):
            for label, port in ports.items():
                times[label] += fetch_as_owner(port, per_round)
    finally:
        for _, p in bares.values():
            p.kill()
            p.wait()
        sh(KVMGATE, "stop", FWD, "--owner", USER, "--force", check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {label: statistics.median(xs) for label, xs in times.items()}
    print("## forwarded port, connect + GET + full response, as the VM's owner")
    print(
        f"bare QEMU hostfwd (baseline) {med['bare']:.2f} ms, bare QEMU hostfwd with kvmgate's -sandbox "
        f"{med['bare+sandbox']:.2f} ms, kvmgate --forward {med['kvmgate']:.2f} ms "
        f"(medians, n={len(times['bare'])} each)"
    )
    print(
        f"ratio kvmgate/bare {med['kvmgate'] / med['bare']:.2f}x ({med['kvmgate'] - med['bare']:+.2f} ms), "
        f"kvmgate/bare+sandbox {med['kvmgate'] / med['bare+sandbox']:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=40)
    args = ap.parse_args()
    setup()
    assert GUEST.exists()
    bridge_bench(args.rounds)
    forward_bench(args.rounds, args.per_round)


if __name__ == "__main__":
    main()
