"""SHA-256 without loading OpenSSL: hashlib's import alone costs the helper
several milliseconds of its start-up budget. CPython ships a builtin module,
_sha256 (3.11) or _sha2 (3.12+); hashlib is the fallback."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _find() -> Callable[[bytes], Any]:
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256


sha256 = _find()


def hexdigest(data: bytes) -> str:
    return str(sha256(data).hexdigest())
