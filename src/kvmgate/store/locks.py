"""The VM operation lock: one per VM, keyed by (owner, name), taken by every verb
and every internal actor (the PAM worker, gated's wake and idle freeze, the
reaper, admin verbs, autostart) before it looks at or changes the VM.

It lives on the registry's storage (STATE/locks/), not on /run, so it is the
same lock for every node that shares the state directory. It is separate from
the liveness lock QEMU holds for its lifetime (`store.runtime`). Whoever takes
it re-checks the VM's state under it: a hibernate racing a thaw sees the other's
result, never half of it.

Lock order (docs/architecture.md): owner -> VM -> network allocation -> logon work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kvmgate.model.digest import sha256
from kvmgate.paths import Paths
from kvmgate.store.files import flock
from kvmgate.store.registry import mkdir_root

WAIT = 60.0  # how long a user's operation waits for another one on the same VM
# kvmgate's own actors (the PAM worker, gated, the reaper, autostart, watch) and root wait
# as long as the longest operation may take (a hibernate or restore), so a logon never
# loses to a slow logoff: they must not give up where a user may.
INTERNAL_WAIT = 3600.0


def lock_dir(paths: Paths) -> str:
    """STATE/locks (root 0700), made on first use."""
    d = os.path.join(paths.state, "locks")
    if not os.path.isdir(d):
        mkdir_root(d, 0o700)
    return d


def lock_path(paths: Paths, owner: str, name: str) -> str:
    """Keyed by (owner, name), not by the identity directory: a delete and a
    re-create of the same name are serialised with everything else on it. The
    file is made when the VM is created (`store.define`), so taking the lock
    changes nothing on disk; a VM from before the lock existed gets it at its
    first operation. Files stay after a delete: removing a lock file others may
    be waiting on would let two holders in."""
    key = sha256(f"{owner}\0{name}".encode()).hexdigest()[:32]
    return os.path.join(lock_dir(paths), f"vm-{key}")


@contextlib.contextmanager
def vm_lock(paths: Paths, owner: str, name: str, timeout: float = WAIT) -> Iterator[None]:
    """Held only after the VM was resolved: a name that does not exist never gets a file."""
    with flock(lock_path(paths, owner, name), timeout, f"{name}"):
        yield


ALLOC_WAIT = 300.0  # a holder stopped for good (a job's owner can SIGSTOP a node's helper) fails others with "busy"


def alloc_lock(paths: Paths) -> contextlib.AbstractContextManager[int]:
    """The network allocation lock (ports, MACs, addresses, taps): host-wide, and
    cluster-wide on a Slurm cluster, whose nodes share the state directory."""
    return flock(os.path.join(paths.state, ".alloc.lock"), ALLOC_WAIT, "the network allocation")
