"""store.files: atomic writes and removing trees someone else could write."""

from __future__ import annotations

import os
from pathlib import Path

from kvmgate.store.files import write_atomic
from kvmgate.store.trees import remove_tree


def test_remove_tree_goes_any_depth_and_never_follows_a_link(tmp_path: Path) -> None:
    """The owner's directory on /run: shutil.rmtree recursed (RecursionError past ~1000
    levels, the review's finding) and the start failed for good."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    top = tmp_path / "own"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(3000):  # deeper than any path name: built by descriptor
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.symlink(victim, "link", dir_fd=fd)
    os.close(fd)
    (top / "file").write_text("y")
    os.symlink(victim, top / "dirlink")
    remove_tree(str(top))
    assert not top.exists()
    assert (victim / "keep").read_text() == "x"
    remove_tree(str(tmp_path / "missing"))  # nothing to do


def _deep(top: Path, depth: int) -> None:
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)


def test_remove_tree_needs_no_descriptor_per_level(tmp_path: Path) -> None:
    """Deeper than the descriptor limit: the subdirectories are moved up, not descended into."""
    import resource

    top = tmp_path / "own"
    top.mkdir()
    _deep(top, 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        assert remove_tree(str(top)) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not top.exists()


def test_remove_tree_stops_at_its_budget_and_a_later_call_finishes(tmp_path: Path) -> None:
    top = tmp_path / "own"
    top.mkdir()
    _deep(top, 300)
    assert remove_tree(str(top), budget=100) is False
    assert top.exists()
    while not remove_tree(str(top), budget=100):
        pass
    assert not top.exists()


def test_write_atomic_replaces_whole_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(str(path), "one", 0o644)
    write_atomic(str(path), "two", 0o600, fsync=True)
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left
