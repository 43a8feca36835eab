"""A text as the ``short_message`` segments of one or more SMPP ``submit_sm``.

GSM 03.38 default alphabet (data_coding 0) when every character is in it, one septet per octet
as SMPP carries it (the SMSC packs them); otherwise UCS2 (data_coding 8), UTF-16-BE with
characters beyond the BMP as surrogate pairs. A text longer than one SMS is cut into parts that
each start with a 6-byte concatenation UDH (8-bit reference) and are sent with UDHI set.

We own this rather than use ``smpplib.gsm.make_parts`` because that cuts the encoded bytes at a
fixed size: an extension character (``€[]{}^~|\\`` and form feed: ESC plus a septet) or a
surrogate pair can straddle two parts, and the handset then shows garbage at the seam.
Lengths are counted in septets (extension characters count two) and UTF-16 units, never in
characters. Grapheme clusters (an emoji with modifiers, a flag) may still be cut between
parts, as handsets expect; only single code points are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

#: data_coding of the SMSC default alphabet (GSM 03.38 here) and of UCS2.
DATA_CODING_GSM7 = 0x00
DATA_CODING_UCS2 = 0x08
#: esm_class with the UDH indicator set: short_message starts with a user data header.
ESM_CLASS_DEFAULT = 0x00
ESM_CLASS_UDHI = 0x40

#: One SMS carries 140 octets: 160 septets or 70 UTF-16 units ...
SINGLE_SEPTETS = 160
SINGLE_UNITS = 70
#: ... less the 6-octet concatenation UDH in each part of a long message (7 septets with fill).
PART_SEPTETS = 153
PART_UNITS = 67
#: The 8-bit concatenation UDH numbers parts 1..255.
MAX_PARTS = 255

#: GSM escape to the extension table; in the text it would change the meaning of the next septet.
_ESCAPE = 0x1B


@dataclass(frozen=True)
class Encoded:
    """A text ready for ``submit_sm``: one ``short_message`` per part, in order."""

    data_coding: int
    esm_class: int
    segments: tuple[bytes, ...]
    parts: int
    encoding: Literal["gsm7", "ucs2"]


def gsm7_septets(text: str) -> bytes | None:
    """``text`` in the GSM 03.38 default alphabet and its extension table, one septet per byte,
    or None when a character is outside it. A literal ESC (U+001B) counts as outside: the codec
    would pass it through and it would turn the next character into an extension character."""
    if "\x1b" in text:
        return None
    try:
        septets: bytes = text.encode("gsm03.38")
    except UnicodeEncodeError:
        return None
    return septets


def _gsm7_characters(septets: bytes) -> list[bytes]:
    """The septets grouped by character: ESC stays with the septet it escapes."""
    characters: list[bytes] = []
    position = 0
    while position < len(septets):
        width = 2 if septets[position] == _ESCAPE and position + 1 < len(septets) else 1
        characters.append(septets[position : position + width])
        position += width
    return characters


def _pack(characters: list[bytes], capacity: int, unit: int) -> list[bytes]:
    """Fill parts of at most ``capacity`` units (``unit`` bytes each) with whole characters."""
    parts: list[bytes] = []
    current = bytearray()
    limit = capacity * unit
    for character in characters:
        if len(current) + len(character) > limit:
            parts.append(bytes(current))
            current = bytearray()
        current += character
    parts.append(bytes(current))
    return parts


def encode_text(text: str, *, reference: int) -> Encoded:
    """Encode ``text`` for SMPP: GSM-7 when it fits the alphabet, else UCS2; one part when it fits
    one SMS, else parts with a concatenation UDH carrying ``reference`` (0..255, the same for
    every part of this message). ValueError for a bad reference or more than 255 parts."""
    if not 0 <= reference <= 0xFF:
        raise ValueError(f"reference {reference} is not an 8-bit value")
    septets = gsm7_septets(text)
    if septets is not None:
        encoding: Literal["gsm7", "ucs2"] = "gsm7"
        data_coding, unit, single, capacity = DATA_CODING_GSM7, 1, SINGLE_SEPTETS, PART_SEPTETS
        whole = septets
        characters = _gsm7_characters(septets)
    else:
        encoding = "ucs2"
        data_coding, unit, single, capacity = DATA_CODING_UCS2, 2, SINGLE_UNITS, PART_UNITS
        characters = [character.encode("utf-16-be") for character in text]
        whole = b"".join(characters)
    if len(whole) <= single * unit:
        return Encoded(data_coding, ESM_CLASS_DEFAULT, (whole,), 1, encoding)
    chunks = _pack(characters, capacity, unit)
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"the text needs {len(chunks)} parts; at most {MAX_PARTS} can be concatenated")
    total = len(chunks)
    segments = tuple(
        bytes((0x05, 0x00, 0x03, reference, total, number)) + chunk
        for number, chunk in enumerate(chunks, start=1)
    )
    return Encoded(data_coding, ESM_CLASS_UDHI, segments, total, encoding)


__all__ = [
    "DATA_CODING_GSM7",
    "DATA_CODING_UCS2",
    "ESM_CLASS_UDHI",
    "MAX_PARTS",
    "PART_SEPTETS",
    "PART_UNITS",
    "SINGLE_SEPTETS",
    "SINGLE_UNITS",
    "Encoded",
    "encode_text",
    "gsm7_septets",
]
