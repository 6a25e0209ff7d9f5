"""Regexes compiled on first use: the helper pays only for the patterns a request needs."""

from __future__ import annotations

import re
from functools import cache


class Regex:
    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern, self.flags = pattern, flags

    @property
    def rx(self) -> re.Pattern[str]:
        return _compile(self.pattern, self.flags)

    def fullmatch(self, text: str) -> re.Match[str] | None:
        return self.rx.fullmatch(text)

    def match(self, text: str) -> re.Match[str] | None:
        return self.rx.match(text)

    def search(self, text: str) -> re.Match[str] | None:
        return self.rx.search(text)


@cache
def _compile(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(pattern, flags)
