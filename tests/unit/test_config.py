"""The policy file and its cache: trusted only when root alone can change them;
any edit invalidates the cache; a cache that fails validation is never used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmgate.errors import PolicyError
from kvmgate.paths import Paths
from kvmgate.store import config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root-owned files")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir(mode=0o755)
    run.mkdir(mode=0o700)
    return Paths(etc=str(etc), run=str(run))


def write(paths: Paths, text: str, mode: int = 0o644) -> None:
    Path(paths.policy).write_text(text)
    os.chmod(paths.policy, mode)


def test_no_file_is_the_default_policy(paths: Paths) -> None:
    assert config.load(paths).stop_timeout == config.load(paths).__class__().stop_timeout


def test_the_parse_is_cached_and_an_edit_invalidates_it(paths: Paths) -> None:
    write(paths, "stop_timeout = 17\n")
    assert config.load(paths).stop_timeout == 17
    cache = Path(paths.run, "policy.cache.json")
    assert json.loads(cache.read_text())["policy"] == {"stop_timeout": 17}
    assert cache.stat().st_mode & 0o077 == 0
    write(paths, "stop_timeout = 23\n")
    assert config.load(paths).stop_timeout == 23


def test_a_tampered_cache_is_validated_like_the_file(paths: Paths) -> None:
    write(paths, "stop_timeout = 17\n")
    config.load(paths)
    cache = Path(paths.run, "policy.cache.json")
    entry = json.loads(cache.read_text())
    entry["policy"] = {"lists": {"user": ["-monitor"]}}  # what the file could never say
    cache.write_text(json.dumps(entry))
    with pytest.raises(PolicyError):
        config.load(paths)


def test_a_cache_others_could_write_is_ignored(paths: Paths) -> None:
    write(paths, "stop_timeout = 17\n")
    config.load(paths)
    cache = Path(paths.run, "policy.cache.json")
    entry = json.loads(cache.read_text())
    entry["policy"] = {"stop_timeout": 99}
    cache.write_text(json.dumps(entry))
    cache.chmod(0o666)
    assert config.load(paths).stop_timeout == 17


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664])
def test_a_policy_others_can_write_is_refused(paths: Paths, mode: int) -> None:
    write(paths, "stop_timeout = 17\n", mode)
    with pytest.raises(PolicyError, match="owned by root"):
        config.load(paths)


def test_a_bad_policy_is_refused_and_not_cached(paths: Paths) -> None:
    write(paths, "stop_timeout = \n")
    with pytest.raises(PolicyError):
        config.load(paths)
    assert not Path(paths.run, "policy.cache.json").exists()
