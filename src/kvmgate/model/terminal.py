"""Guest output made visible instead of interpreted, for a viewer who is not the
VM's owner (root with --owner): a guest can write escape sequences that set
the viewer's clipboard (OSC 52), retitle the window, clear the screen, or make
the terminal answer (`ESC[6n`) into the viewer's shell. Like `less` without -R:
C0 controls other than tab and newline become `^X` (a carriage return is kept
before a newline only: alone, it could write over what the line said),
DEL `^?`, C1 controls `<U+009B>`, and bytes that are not UTF-8 `\\xNN`. Pure
and incremental: a sequence split across reads is decoded as one.
"""

from __future__ import annotations

import codecs

KEPT = "\t\n"


def _show(ch: str) -> str:
    o = ord(ch)
    if o < 0x20 and ch not in KEPT:
        return "^" + chr(o + 0x40)
    if o == 0x7F:
        return "^?"
    if 0x80 <= o <= 0x9F:
        return f"<U+{o:04X}>"
    return ch


class Visible:
    """Feed bytes, get bytes that a terminal shows literally."""

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self._cr = ""  # a carriage return at the end of a read: what follows decides

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text = self._cr + self._decode.decode(data, final)
        self._cr = "\r" if text.endswith("\r") and not final else ""
        lines = text[: len(text) - len(self._cr)].split("\r\n")
        return "\r\n".join(
            "".join(_show(c) if c < " " or "\x7f" <= c <= "\x9f" else c for c in ln) for ln in lines
        ).encode()
