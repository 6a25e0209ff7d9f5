"""Wake on connect: first-byte latency through kvmgate-gated to a running, a
paused and a hibernated VM, vs. a direct connection to the running VM's
forward (same run); and gated's memory with 200 idle listeners.

    sudo .venv/bin/python bench/gated.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import statistics
import subprocess
import time

from common import BOOT, GUEST_BOOT_LINE, KVMGATE, USER, define, setup, sh

VM = "benchgate"
MANY = "benchmany"


def first_byte(port: int, timeout: float = 60) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(1)
    return (time.perf_counter() - t0) * 1000


def start_gated() -> subprocess.Popen[str]:
    pw = pwd.getpwnam("kvmgate-gated")
    p = subprocess.Popen(
        ["/usr/local/lib/kvmgate/kvmgate-gated"],
        stdout=subprocess.PIPE,
        text=True,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    assert p.stdout and "listening" in p.stdout.readline()
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    setup()
    append = "console=ttyS0 quiet kvmgate.httpd"
    define(VM, "-m", "256", "-nographic", "-net", "nic", "-net", "user", *BOOT[:-1], append)
    sh(KVMGATE, "admin", "set", VM, "--owner", USER, "--forward", "http", "--wake", "on")
    fw = json.loads(sh(KVMGATE, "admin", "show", VM, "--owner", USER, "--json").stdout)["forwards"][0]
    listen, internal = fw["port"], fw["internal"]
    sh(KVMGATE, "start", VM, "--owner", USER)
    sh(KVMGATE, "console", VM, "--owner", USER, "--expect", "KVMGATE-GUEST-NET", "--timeout", "120")
    sh(KVMGATE, "console", VM, "--owner", USER, "--expect", GUEST_BOOT_LINE, "--timeout", "120")
    gated = start_gated()
    direct, running, paused, hibernated = [], [], [], []
    try:
        for _ in range(args.runs):
            direct.append(first_byte(internal))
            running.append(first_byte(listen))
            time.sleep(0.2)
            sh(KVMGATE, "freeze", VM, "--owner", USER)
            paused.append(first_byte(listen))
            time.sleep(0.2)
            sh(KVMGATE, "hibernate", VM, "--owner", USER)
            hibernated.append(first_byte(listen))
            time.sleep(0.2)
        for title, xs in (
            ("direct to the running VM's forward (baseline)", direct),
            ("through gated, VM running", running),
            ("through gated, VM paused", paused),
            ("through gated, VM hibernated", hibernated),
        ):
            print(f"first byte, {title}: median {statistics.median(xs):.1f} ms (n={len(xs)})")
        base = statistics.median(direct)
        print(
            f"ratios to direct: running {statistics.median(running) / base:.1f}x, "
            f"paused {statistics.median(paused) / base:.1f}x, hibernated {statistics.median(hibernated) / base:.1f}x"
        )
    finally:
        gated.terminate()
        gated.wait()
        sh(KVMGATE, "stop", VM, "--owner", USER, "--force", check=False)
    # memory with 200 idle listeners
    define(MANY, "-m", "64", "-nographic", "-net", "nic", "-net", "user")
    sh(
        KVMGATE,
        "admin",
        "set",
        MANY,
        "--owner",
        USER,
        "--forward",
        ",".join(f"p{1000 + i}={1000 + i}" for i in range(200)),
        "--wake",
        "on",
    )
    gated = start_gated()
    try:
        time.sleep(1)
        with open(f"/proc/{gated.pid}/net/tcp") as f:
            listening = sum(1 for line in f if " 0A " in line)
        with open(f"/proc/{gated.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        print(
            f"kvmgate-gated with 200 idle listeners: VmRSS {rss / 1024:.1f} MiB ({listening} sockets listening "
            "in its network namespace)"
        )
    finally:
        gated.terminate()
        gated.wait()
        sh(KVMGATE, "admin", "set", MANY, "--owner", USER, "--forward", "none", "--wake", "off")
        sh(KVMGATE, "admin", "set", VM, "--owner", USER, "--forward", "none", "--wake", "off")
    _ = os


if __name__ == "__main__":
    main()
