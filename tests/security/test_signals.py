"""Signals never leave a half-done operation (hardening 3).

A user can signal their own sudo, which relays the signal to the helper, and a
terminal signals the whole foreground group. The helper is paused at named
points (the suite's installation only), signalled there, and released. The
operation must finish: the VM is running or hibernated with a consistent
record, and the helper's exit says what really happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import KVMGATE, RUN, STATE, Kvmgate, Pause, as_user, parent_of, popen_as, qemu_pids

RELAYED = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM]


def _popen_as(user: str, *args: str) -> subprocess.Popen[str]:
    return popen_as(user, [KVMGATE, *args], stderr=subprocess.PIPE)


def _signal_at(user: str, point: str, sig: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `kvmgate ARGS` as user, pause the helper at `point`, send `sig` the way
    the user can (to their own sudo, which relays it) and the way a terminal does
    (to the helper itself), then let it go on."""
    with Pause(point) as pause:
        p = _popen_as(user, *args)
        helper = pause.reached()
        sudo = parent_of(helper)
        assert Path(f"/proc/{sudo}/comm").read_text().strip() == "sudo"
        assert as_user(user, ["kill", f"-{sig}", str(sudo)]).returncode == 0, "the user may signal their own sudo"
        os.kill(helper, sig)  # as the terminal's driver would
        time.sleep(0.3)  # let sudo relay
        pause.release()
        out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _no_temporaries() -> None:
    leftovers = [p for p in Path(STATE, "vms").rglob("*.tmp")] + [p for p in Path(RUN).rglob("*.tmp")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("sig", RELAYED, ids=lambda s: signal.Signals(s).name)
def test_a_signal_after_qemu_is_spawned_never_loses_the_vm(kg: Kvmgate, alice: str, alice_vm: str, sig: int) -> None:
    """Once: the helper died between spawning QEMU and recording its pid, so a
    QEMU ran that kvmgate did not know about."""
    kg("stop", alice_vm, "--owner", alice, "--force")
    try:
        r = _signal_at(alice, "start:spawned", sig, "start", alice_vm)
        assert r.returncode == 0, r.stderr
        st = kg.json("status", alice_vm, "--owner", alice)
        assert st["state"] == "running" and st["pid"] in qemu_pids(), st
        _no_temporaries()
    finally:
        kg("stop", alice_vm, "--owner", alice, "--force")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_hibernate_keeps_the_saved_state(kg: Kvmgate, alice: str, alice_vm: str, sig: int) -> None:
    """Once: a signal between writing the state and stopping QEMU left both a
    running QEMU and a saved state."""
    kg("stop", alice_vm, "--owner", alice, "--force")
    kg.ok("start", alice_vm, user=alice)
    try:
        r = _signal_at(alice, "hibernate:saved", sig, "hibernate", alice_vm)
        assert r.returncode == 0, r.stderr
        st = kg.json("status", alice_vm, "--owner", alice)
        assert st["state"] == "hibernated", st
        _no_temporaries()
        kg.ok("start", alice_vm, user=alice)
        assert kg.json("status", alice_vm, "--owner", alice)["state"] == "running"
    finally:
        kg("stop", alice_vm, "--owner", alice, "--force")


def test_a_signal_while_waiting_for_the_lock_interrupts_at_once(kg: Kvmgate, alice: str, alice_vm: str) -> None:
    """Holding nothing, the helper stops at once (exit 130) and changes nothing."""
    kg("stop", alice_vm, "--owner", alice, "--force")
    with Pause("start:spawned") as pause:
        first = _popen_as(alice, "start", alice_vm)
        pause.reached()
        second = _popen_as(alice, "start", alice_vm)
        time.sleep(1)  # waiting for the VM's lock
        second.send_signal(signal.SIGTERM)  # to its sudo, which relays it
        _, err = second.communicate(timeout=30)
        assert second.returncode == 130 and err == "kvmgate: interrupted\n", (second.returncode, err)
        pause.release()
        first.communicate(timeout=60)
    assert first.returncode == 0
    kg("stop", alice_vm, "--owner", alice, "--force")
