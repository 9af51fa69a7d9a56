"""Decoding the text files a user gives (sweeps, prompt files): UTF-8, with an error that names the byte.

Python's UnicodeDecodeError names a codec position but no file or line; this names both, so a file saved
as Latin-1 or UTF-16 is reported as such instead of as a traceback.
"""

from __future__ import annotations

import codecs


class NotUtf8Error(ValueError):
    """The bytes are not UTF-8. The message names `what`, the byte, its offset and its line."""


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 text of `data` (a leading byte-order mark is dropped)."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise NotUtf8Error(
            f"{what} is not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) "
            f"cannot be decoded; save the file as UTF-8"
        ) from None
