"""model.terminal: guest output shown to someone who is not the owner cannot
drive their terminal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmgate.model.terminal import Visible

CONTROL = set(range(0x20)) - {0x09, 0x0A, 0x0D} | {0x7F}  # CR only before LF (below)


def test_sequences_that_would_act_on_the_terminal_are_shown() -> None:
    v = Visible()
    out = v.feed(b"\x1b]52;c;aGk=\x07\x1b]0;title\x07\x1b[2J\x1b[6n ok\r\n\xc2\x9b2J \xff")
    assert out == b"^[]52;c;aGk=^G^[]0;title^G^[[2J^[[6n ok\r\n<U+009B>2J \\xff"


def test_text_and_split_utf8_pass_through() -> None:
    v = Visible()
    assert v.feed("grüß ".encode()[:3]) + v.feed("grüß ".encode()[3:]) == "grüß ".encode()


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_no_control_byte_ever_reaches_the_viewer(chunks: list[bytes]) -> None:
    v = Visible()
    out = b"".join(v.feed(c) for c in chunks) + v.feed(b"", final=True)
    assert not CONTROL & set(out)
    text = out.decode()  # always valid UTF-8
    assert not any(0x80 <= ord(c) <= 0x9F for c in text)


def test_a_lone_carriage_return_cannot_write_over_a_line() -> None:
    """`rm -rf ~\rls -l` showed as `ls -l`. CRLF stays (a raw-mode console needs it)."""
    v = Visible()
    out = v.feed(b"rm -rf ~\rls -l\r") + v.feed(b"\nnext\r") + v.feed(b"", final=True)
    assert out == b"rm -rf ~^Mls -l\r\nnext^M"


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_every_carriage_return_left_ends_a_line(chunks: list[bytes]) -> None:
    v = Visible()
    out = b"".join(v.feed(c) for c in chunks) + v.feed(b"", final=True)
    assert out.count(b"\r") == out.count(b"\r\n")
