"""The split of a text into SMPP segments: septet and UTF-16 unit counts, and seams that never
cut an extension character or a surrogate pair (where smpplib's own splitter does)."""

from __future__ import annotations

import pytest
import smpplib.consts
import smpplib.gsm

from controller.sender.parts import encode_text, gsm7_septets

UDH_LENGTH = 6


def body(segment: bytes, parts: int) -> bytes:
    """The text part of a segment, without its UDH when the message has several parts."""
    return segment[UDH_LENGTH:] if parts > 1 else segment


def decode(encoded_segments: tuple[bytes, ...], coding: str, parts: int) -> str:
    joined = b"".join(body(s, parts) for s in encoded_segments)
    return joined.decode("gsm03.38" if coding == "gsm7" else "utf-16-be")


def test_short_gsm_text_is_one_part_in_septets() -> None:
    encoded = encode_text("Hello @ £1 Ü", reference=7)
    assert (encoded.data_coding, encoded.esm_class, encoded.parts, encoded.encoding) == (0, 0, 1, "gsm7")
    assert encoded.segments == ("Hello @ £1 Ü".encode("gsm03.38"),)
    assert encoded.segments[0][0:1] == b"H" and b"\x00" in encoded.segments[0]  # '@' is septet 0


def test_160_septets_fit_one_part_and_161_make_two() -> None:
    assert encode_text("a" * 160, reference=1).parts == 1
    # An extension character counts two septets: 158 + '€' is 160.
    assert encode_text("a" * 158 + "€", reference=1).parts == 1
    assert encode_text("a" * 159 + "€", reference=1).parts == 2
    two = encode_text("a" * 161, reference=9)
    assert two.parts == 2 and two.esm_class == 0x40 and two.data_coding == 0
    assert two.segments[0][:UDH_LENGTH] == bytes((5, 0, 3, 9, 2, 1))
    assert two.segments[1][:UDH_LENGTH] == bytes((5, 0, 3, 9, 2, 2))
    assert [len(body(s, 2)) for s in two.segments] == [153, 8]


def test_70_units_fit_one_ucs2_part_and_71_make_two() -> None:
    one = encode_text("ж" * 70, reference=3)
    assert (one.encoding, one.data_coding, one.parts, one.esm_class) == ("ucs2", 8, 1, 0)
    assert one.segments == (("ж" * 70).encode("utf-16-be"),)
    two = encode_text("ж" * 71, reference=3)
    assert two.parts == 2 and two.esm_class == 0x40
    assert [len(body(s, 2)) for s in two.segments] == [134, 8]


def test_an_emoji_counts_two_units() -> None:
    assert encode_text("a" * 68 + "😀", reference=0).parts == 1
    assert encode_text("a" * 69 + "😀", reference=0).parts == 2


def test_euro_at_a_part_boundary_moves_whole_to_the_next_part() -> None:
    text = "a" * 152 + "€" + "b" * 20
    encoded = encode_text(text, reference=200)
    first, second = (body(s, encoded.parts) for s in encoded.segments)
    assert len(first) == 152 and first[-1] != 0x1B
    assert second.startswith(b"\x1b\x65")
    assert decode(encoded.segments, "gsm7", encoded.parts) == text


def test_an_emoji_at_a_ucs2_boundary_is_never_split() -> None:
    text = "ж" * 66 + "😀" + "ж" * 10
    encoded = encode_text(text, reference=5)
    first, second = (body(s, encoded.parts) for s in encoded.segments)
    assert len(first) == 132  # 66 units: the pair would have made it 68
    assert second.startswith("😀".encode("utf-16-be"))
    for part in (first, second):
        part.decode("utf-16-be")  # each part is valid UTF-16 on its own
    assert decode(encoded.segments, "ucs2", encoded.parts) == text


def test_exactly_two_full_parts() -> None:
    text = "x" * (153 * 2)
    encoded = encode_text(text, reference=42)
    assert encoded.parts == 2
    assert [len(s) for s in encoded.segments] == [UDH_LENGTH + 153, UDH_LENGTH + 153]
    assert {s[3] for s in encoded.segments} == {42}


def test_characters_outside_the_alphabet_and_a_literal_escape_choose_ucs2() -> None:
    assert encode_text("ça va", reference=0).encoding == "ucs2"  # only Ç is in GSM 03.38
    assert encode_text("a\x1bb", reference=0).encoding == "ucs2"
    assert gsm7_septets("\x0c") == b"\x1b\x0a"  # form feed is an extension character


def test_limits() -> None:
    assert encode_text("a" * 153 * 255, reference=0).parts == 255
    with pytest.raises(ValueError, match="parts"):
        encode_text("a" * (153 * 255 + 1), reference=0)
    with pytest.raises(ValueError, match="8-bit"):
        encode_text("a", reference=256)
    assert encode_text("", reference=0).segments == (b"",)


def test_smpplib_make_parts_splits_an_escape_and_a_surrogate_pair() -> None:
    """The defect its FIXME admits, and why parts.py exists: a fixed-size cut of the encoded text
    leaves ESC at the end of one part and its character at the start of the next, and cuts an
    emoji's surrogate pair in two. Our split of the same texts keeps both whole."""
    gsm_text = "a" * 152 + "€" + "b" * 20
    theirs, _, _ = smpplib.gsm.make_parts(gsm_text, smpplib.consts.SMPP_ENCODING_DEFAULT)
    assert theirs[0][-1] == 0x1B and theirs[1][UDH_LENGTH] == 0x65  # the seam cuts '€'
    ours = encode_text(gsm_text, reference=0)
    assert all(s[-1] != 0x1B for s in ours.segments)

    ucs2_text = "ж" * 66 + "😀" + "ж" * 10
    theirs, coding, _ = smpplib.gsm.make_parts(ucs2_text, smpplib.consts.SMPP_ENCODING_DEFAULT)
    assert coding == smpplib.consts.SMPP_ENCODING_ISO10646
    with pytest.raises(UnicodeDecodeError):
        theirs[0][UDH_LENGTH:].decode("utf-16-be")  # ends on a lone high surrogate
    ours = encode_text(ucs2_text, reference=0)
    for segment in ours.segments:
        segment[UDH_LENGTH:].decode("utf-16-be")
