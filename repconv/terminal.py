"""Text that came from a file, made safe to show on a terminal.

A checkpoint's metadata, a config's values and the names inside a pickle are whoever wrote the
file's words: an ESC or CR sequence in them could erase an error line and draw a fake "passed".
Everything such text holds that is not printable is shown as a Python-style escape.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: object) -> str:
    """`text` with every non-printable character escaped (`\\x1b`, `\\r`, `\\u202e`, ...)."""
    return "".join(ch if ch.isprintable() else _NAMED.get(ch) or _escape(ch) for ch in str(text))


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
