"""Removing trees that someone else could write: a VM's disks (the owner's),
the owner's directory on /run. Kept apart from store.files: a plain start only
needs it when the owner left something behind."""

from __future__ import annotations

import contextlib
import os


def remove_tree(path: str, budget: int = 1 << 20) -> bool:
    """Remove a tree someone else could write (a VM's disks, the owner's directory
    on /run). Whatever its depth, with at most three descriptors: a directory
    that is not empty has its subdirectories moved up to the top of the tree
    (renames by descriptor, never following a link), so nothing recurses and
    nothing is opened deeper than one level. Stops after `budget` entries (the
    owner may keep adding while root removes): returns False, and a later call
    (`admin reap`) goes on where this one stopped."""
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if _remove_entry(pfd, name):
            return True
        try:
            top = os.open(name, flags, dir_fd=pfd)
        except (FileNotFoundError, NotADirectoryError):
            return True
        try:
            moved = 0
            while budget > 0:
                seen = 0
                with os.scandir(top) as children:  # streamed: a huge directory never sits in root's memory
                    for child in children:
                        seen, budget = seen + 1, budget - 1
                        if budget <= 0:
                            break
                        if _remove_entry(top, child.name):
                            continue
                        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
                            sub = os.open(child.name, flags, dir_fd=top)
                            try:
                                with os.scandir(sub) as entries:
                                    for entry in entries:
                                        budget -= 1
                                        if budget <= 0:
                                            break
                                        if not _remove_entry(sub, entry.name):  # a directory with entries: up
                                            moved += 1
                                            with contextlib.suppress(OSError):
                                                os.rename(
                                                    entry.name, f".kvmgate-rm-{moved}", src_dir_fd=sub, dst_dir_fd=top
                                                )
                            finally:
                                os.close(sub)
                            _remove_entry(top, child.name)
                if not seen:
                    break
            return _remove_entry(pfd, name)
        finally:
            os.close(top)
    finally:
        os.close(pfd)


def _remove_entry(dfd: int, name: str) -> bool:
    """unlink or rmdir `name` in `dfd`; True if it is gone, False if it is a
    directory that still has entries (or cannot be removed)."""
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        pass
    except OSError:
        return False
    try:
        os.rmdir(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
