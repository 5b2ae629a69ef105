"""Token text for people: every token visible, none able to rewrite the page or the terminal.

Tokenizers emit tokens that are only whitespace (newlines, tabs, runs of
spaces), control characters, zero-width or bidirectional-override characters,
lone bytes of a split UTF-8 sequence, or nothing at all. Shown as they are,
such a token is an empty box that cannot be seen or clicked, moves the text
around it (U+202E reverses what follows), or drives the terminal (ESC starts an
escape sequence). `pieces` cuts a token's text into runs of ordinary text and
visible stand-ins; every view (HTML, terminal, PNG labels) draws from it, and
the data a view carries keeps the true token text beside it.

Stand-ins: ``⏎`` newline, ``⇥`` tab, ``·`` a space of a whitespace-only token,
``⟨CR⟩``, ``⟨ESC⟩``, ``⟨NUL⟩``... the other C0 controls and DEL by their
standard abbreviations, ``⟨U+XXXX⟩`` every other control, format, separator, private-use, unassigned or
blank-looking code point, ``⟨0xNN⟩`` a byte that is not valid UTF-8 on its own,
``◌`` before a token made only of combining marks, ``∅`` an empty token.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

_NAMED = {"\n": "\u23ce", "\t": "\u21e5"}
# the C0 controls by their standard abbreviations (fonts lack the Control Pictures block more often than not)
_C0 = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC "
       "FS GS RS US").split()
_SPACE = "\u00b7"
# Letters and symbols that render as nothing (Hangul fillers, Braille blank, combining grapheme joiner).
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Zs", "Co", "Cn", "Cs"})


def _stand_in(ch: str, blank_token: bool) -> str | None:
    """The visible form of ``ch``, or None when it is shown as it is."""
    if ch == " ":
        return _SPACE if blank_token else None
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x20 or code == 0x7F:
        return f"\u27e8{_C0[code] if code < 0x20 else 'DEL'}\u27e9"
    if 0xDC80 <= code <= 0xDCFF:  # a byte kept by errors="surrogateescape"
        return f"\u27e80x{code - 0xDC00:02X}\u27e9"
    if ch in _BLANK or unicodedata.category(ch) in _HIDDEN_CATEGORIES:
        return f"\u27e8U+{code:04X}\u27e9"
    return None


@lru_cache(maxsize=65536)
def pieces(text: str) -> tuple[tuple[str, bool], ...]:
    """``text`` as runs ``(shown, is_stand_in)``; joined, the shown runs are never empty or invisible."""
    if text == "":
        return (("\u2205", True),)
    blank = text.strip(" \t\n\r") == "" or all(unicodedata.category(c).startswith("Z") for c in text)
    runs: list[tuple[str, bool]] = []
    if all(unicodedata.category(c) in ("Mn", "Me") for c in text):
        runs.append(("\u25cc", True))  # a dotted circle carries lone combining marks
    for ch in text:
        sub = _stand_in(ch, blank)
        shown, flag = (ch, False) if sub is None else (sub, True)
        if runs and runs[-1][1] == flag:
            runs[-1] = (runs[-1][0] + shown, flag)
        else:
            runs.append((shown, flag))
    return tuple(runs)


def shown(text: str) -> str:
    """The visible form of a token's text (see `pieces`)."""
    return "".join(s for s, _ in pieces(text))


def terminal_safe(text: str) -> str:
    """``text`` with what could drive or mislead a terminal made visible: controls other than newline
    and tab (ESC starts escape sequences), bidirectional overrides and isolates, lone surrogates.

    For whole texts (a generated reply, a transcript) rather than single tokens: every printable
    character stays, and so do joiners and variation selectors, which emoji and scripts need.
    """
    if text.isprintable():
        return text
    return "".join(_stand_in(ch, False) or ch if _drives_terminal(ch) else ch for ch in text)


def _drives_terminal(ch: str) -> bool:
    code = ord(ch)
    if ch in "\n\t":
        return False
    return code < 0x20 or 0x7F <= code <= 0x9F or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069 \
        or 0xD800 <= code <= 0xDFFF
