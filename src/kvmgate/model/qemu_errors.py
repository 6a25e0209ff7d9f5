"""QEMU's refusals, told in the user's words.

QEMU sees the user's files only as /dev/fdset/N (disks), /proc/self/fd/N
(copied kernels, initrds and ROMs) and kvmgate's node names
(`hda-fmt`), so its message about a locked image or a broken header names
neither the option nor the file the user gave. `explain` turns the last line
QEMU wrote before it gave up into one line that does, and recognises the
refusals users meet (an image another VM holds, a -loadvm tag that is missing
or holds no VM state). Pure: text and the Plan in, text out.
"""

from __future__ import annotations

import re

from kvmgate.model.translate import Plan

_FDSET = re.compile(r"/dev/fdset/(\d+)|/proc/self/fd/(\d+)")
_BLOCKDEV = re.compile(r'^-blockdev \{.*?"node-name":"([a-z0-9]+)-(?:file|fmt|overlay|snap)".*?\}: ')
_PREFIX = re.compile(r"^(?:\d{4}-\d\d-\d\dT[\d:.]+Z )?qemu-system-[a-z0-9_]+: ")
_SNAPSHOT = re.compile(r"Snapshot '(.*)' does not exist")


def _names(plan: Plan) -> tuple[dict[int, str], dict[str, str]]:
    """fd -> what the user calls it; drive node -> "-hda /home/a/d.qcow2"."""
    by_fd: dict[int, str] = {}
    by_node: dict[str, str] = {}
    disks = {r.of: r.path for r in plan.resources if r.kind == "disk" and r.of and r.path}
    for r in plan.resources:
        if r.kind in ("disk", "blob") and r.path:
            by_fd[r.fd] = r.path
            if r.kind == "disk" and r.of:
                by_node[r.of] = f"-{r.of} {r.path}"
        elif r.kind == "overlay" and r.of:
            by_fd[r.fd] = f"the -snapshot overlay of {disks.get(r.of, r.of)}"
    return by_fd, by_node


def explain(log_tail: list[str], plan: Plan) -> str:
    """One line for QEMU's refusal, from the last lines it logged."""
    by_fd, by_node = _names(plan)
    lines = [_PREFIX.sub("", ln.strip()) for ln in log_tail if ln.strip()]
    text = " ".join(lines[-2:]) if lines else "QEMU exited without saying why"
    text = _FDSET.sub(lambda m: by_fd.get(int(m.group(1) or m.group(2)), "a file kvmgate opened"), text)
    node = _BLOCKDEV.match(text)
    if node:
        text = f"{by_node.get(node.group(1), '-' + node.group(1))}: {text[node.end() :]}"
    if 'Failed to get "write" lock' in text or 'Failed to get "shared" lock' in text:
        image = re.search(r"Is another process using the image \[(.*)\]\?", text)
        return f"{image.group(1) if image else 'an image'}: in use by another VM (QEMU could not lock it)"
    if "disk-only snapshot" in text:
        return f"-loadvm {plan_tag(plan)}: a disk-only snapshot, which holds no VM state to start from"
    missing = _SNAPSHOT.search(text)
    if missing:
        return f"-loadvm {missing.group(1)}: no snapshot of that name in the VM's disks"
    return text[:300]


def plan_tag(plan: Plan) -> str:
    argv = list(plan.argv)
    return argv[argv.index("-loadvm") + 1] if "-loadvm" in argv else "?"
