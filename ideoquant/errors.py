"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides: a
# name read from a file must not be able to start a new line or reorder what is shown.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class IdeoquantError(Exception):
    """A user-facing failure: bad input, refused output, failed verification."""


def printable(text: str) -> str:
    """`text` with control and line-breaking characters escaped (`\\n`, `\\x1b`, `\\u2028`)."""

    def escape(m: re.Match) -> str:
        c = m.group()
        return repr(c)[1:-1] if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _UNPRINTABLE.sub(escape, text)
