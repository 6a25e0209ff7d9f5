"""Choosing host resources for a VM: ports, MACs, addresses, tap names. Pure.

The caller holds the registry's allocation lock and passes in everything already
taken; these functions only choose. Every choice is the first free value in a
fixed order, so the same registry gives the same answer, and a VM that is
deleted frees its values for the next VM.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from kvmgate.errors import Exhausted
from kvmgate.model.translate import mac_for


def first_free(
    candidates: Iterable[int], taken: Collection[int], usable: Callable[[int], bool] = lambda _: True
) -> int:
    for c in candidates:
        if c not in taken and usable(c):
            return c
    raise Exhausted("no free value left in the pool")


def mac(key: str, index: int, taken: Collection[str]) -> str:
    """A MAC for NIC `index` of the VM that no other VM holds."""
    for attempt in range(1 << 16):
        m = mac_for(key, index, attempt)
        if m not in taken:
            return m
    raise Exhausted("no free MAC address")


def tap(prefix: str, taken: Collection[str], limit: int = 1 << 20) -> str:
    """`<prefix>t<n>`: unique across the host's VMs, so a tap name always means one
    VM's NIC (the anti-spoofing rules are keyed on it)."""
    return f"{prefix}t{first_free(range(limit), {int(t[len(prefix) + 1 :]) for t in taken if _ours(prefix, t)})}"


def _ours(prefix: str, name: str) -> bool:
    return name.startswith(prefix + "t") and name[len(prefix) + 1 :].isdigit()
