"""The SMS TPDU codec: round trips, splitting, bad input, and each python-gsmmodem-new decoding
defect from shared/notes/python-gsmmodem.md, with the library's own decoder shown failing it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from gsmmodem.pdu import decodeSmsPdu

from hardware.sms_pdu import (
    Alphabet,
    DataCoding,
    PduError,
    TypeOfNumber,
    build_udh,
    concat_element,
    decode_deliver,
    decode_units,
    encode_deliver,
    pack_septets,
    tpdu_length,
)

UTC = UTC
VECTORS = json.loads((Path(__file__).parent / "vectors" / "sms_deliver.json").read_text())


def ours(pdu: str) -> str:
    return decode_deliver(pdu).text


def library(pdu: str) -> str:
    text: str = decodeSmsPdu(pdu)["text"]
    return text


def joined(pdus: list[str]) -> str:
    parts = [decode_deliver(p) for p in pdus]
    return decode_units(parts[0].coding.alphabet, b"".join(p.units for p in parts))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "",
        "@" * 8,  # a final @ when the septet count is a multiple of 8
        "1234567",  # 7 septets leave 7 spare bits that look like a trailing @
        "€[]{}~^\\|§ and a form feed \x0c",
        "x" * 160,  # the longest single GSM 7-bit part
    ],
)
def test_gsm7_round_trip(text: str) -> None:
    pdus = encode_deliver("+447700900123", text, smsc="+447785016005")
    assert len(pdus) == 1
    sms = decode_deliver(pdus[0])
    assert sms.text == text
    assert sms.coding.alphabet is Alphabet.GSM7
    assert sms.sender.value == "+447700900123" and sms.sender.ton is TypeOfNumber.INTERNATIONAL
    assert sms.smsc is not None and sms.smsc.value == "+447785016005"


@pytest.mark.parametrize("text", ["Grüße 😀", "日本語のテキスト", "👍🏽 family: 👨‍👩‍👧", "x" * 69 + "😀"])
def test_ucs2_round_trip_keeps_emoji_whole(text: str) -> None:
    pdus = encode_deliver("MyBank", text)
    assert joined(pdus) == text
    assert decode_deliver(pdus[0]).coding.alphabet is Alphabet.UCS2
    joined(pdus).encode("utf-8")  # no lone surrogates: it must encode for JSON / MQTT


@pytest.mark.parametrize("ref_bits", [8, 16])
@pytest.mark.parametrize(
    ("text", "parts"),
    [("a" * 161, 2), ("€" * 153, 3), ("b" * 152 * 5, 5), ("ü😀" * 80, 4)],
)
def test_long_text_splits_and_joins(text: str, parts: int, ref_bits: int) -> None:
    pdus = encode_deliver("+15551234567", text, ref=0x1234, ref_bits=ref_bits)
    decoded = [decode_deliver(p) for p in pdus]
    assert len(pdus) == parts
    for seq, sms in enumerate(decoded, start=1):
        assert sms.concat is not None
        assert (sms.concat.seq, sms.concat.total, sms.concat.ref_bits) == (seq, parts, ref_bits)
        assert sms.concat.ref == (0x1234 if ref_bits == 16 else 0x34)
        # first octet, 8-octet sender, PID, DCS, SCTS, UDL: 19 octets before at most 140 of data
        assert tpdu_length(sms.pdu) - 19 <= 140
    assert joined(pdus) == text


def test_split_never_cuts_an_escape_or_a_surrogate_pair() -> None:
    text = "a" * 152 + "€" + "b" * 10  # the escape of € would fall on the last septet of part 1
    parts = [decode_deliver(p) for p in encode_deliver("+1555", text)]
    assert parts[0].text == "a" * 152 and parts[1].text.startswith("€")
    text = "c" * 66 + "😀" + "d" * 10  # the high surrogate would end part 1 (67 units a part)
    parts = [decode_deliver(p) for p in encode_deliver("+1555", text)]
    assert [p.text for p in parts] == ["c" * 66, "😀" + "d" * 10]


def test_alphanumeric_sender_of_every_length() -> None:
    for n in range(1, 12):
        name = "Ab3_ @"[: n % 6 + 1] + "X" * max(0, n - 6)
        sms = decode_deliver(encode_deliver(name, "hi")[0])
        assert sms.sender.value == name and sms.sender.ton is TypeOfNumber.ALPHANUMERIC


def test_scts_zone_and_flash_and_pid() -> None:
    when = datetime(2024, 2, 29, 23, 59, 58, tzinfo=timezone(timedelta(hours=-3, minutes=-30)))
    sms = decode_deliver(encode_deliver("+1555", "x", scts=when, flash=True, pid=0x40)[0])
    assert sms.scts == when and sms.scts.utcoffset() == timedelta(hours=-3, minutes=-30)
    assert sms.is_flash and sms.coding.message_class == 0 and sms.is_silent
    assert decode_deliver(encode_deliver("+1555", "x", pid=0x43)[0]).replace_type == 3


def test_tpdu_length_excludes_smsc() -> None:
    pdu = encode_deliver("+1555", "hello", smsc="+447785016005")[0]
    assert tpdu_length(pdu) == len(bytes.fromhex(pdu)) - 8


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pdu", "message"),
    [
        ("zz", "not hexadecimal"),
        ("", "SMSC length"),
        ("0791448720003023", "first octet"),
        ("07914487200030230100", "not an SMS-DELIVER"),
        ("0791448720003023040B914477009001F200004220921263400005E8329BFD", "user data holds"),
        ("0791448720003023040B914477009001F20000FF20921263400001E8", "SCTS"),
        ("0791448720003023440B914477009001F2000042209212634000050500030A", "header"),
        ("0791448720003023040B914477009001F20008422092126340008C0041", "user-data length"),
    ],
)
def test_broken_pdus_give_a_clear_error(pdu: str, message: str) -> None:
    with pytest.raises(PduError, match=message):
        decode_deliver(pdu)


def test_encoding_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(PduError, match="longer than 11"):
        encode_deliver("ABCDEFGHIJKL", "x")
    with pytest.raises(PduError, match="outside GSM"):
        encode_deliver("+1555", "😀", encoding="gsm7")
    with pytest.raises(PduError, match="timezone-aware"):
        encode_deliver("+1555", "x", scts=datetime(2024, 1, 1))


# --- data coding groups (TS 23.038 §4) -------------------------------------------------------


@pytest.mark.parametrize(
    ("dcs", "alphabet", "klass", "extra"),
    [
        (0x00, Alphabet.GSM7, None, {}),
        (0x08, Alphabet.UCS2, None, {}),
        (0x10, Alphabet.GSM7, 0, {}),
        (0x03, Alphabet.GSM7, None, {}),  # class bits without bit 4 mean nothing
        (0x19, Alphabet.UCS2, 1, {}),
        (0x44, Alphabet.DATA_8BIT, None, {"auto_delete": True}),
        (0xC8, Alphabet.GSM7, None, {"message_waiting": (False, True, 0)}),
        (0xD9, Alphabet.GSM7, None, {"message_waiting": (True, True, 1)}),
        (0xE8, Alphabet.UCS2, None, {"message_waiting": (True, True, 0)}),
        (0xF0, Alphabet.GSM7, 0, {}),
        (0xF4, Alphabet.DATA_8BIT, 0, {}),
        (0xF6, Alphabet.DATA_8BIT, 2, {}),
        (0x80, Alphabet.GSM7, None, {}),  # reserved group: assumed GSM 7-bit
    ],
)
def test_every_coding_group(dcs: int, alphabet: Alphabet, klass: int | None, extra: dict[str, Any]) -> None:
    coding = DataCoding.parse(dcs)
    assert coding.alphabet is alphabet and coding.message_class == klass
    for name, value in extra.items():
        assert getattr(coding, name) == value


# --- the library's defects: ours right, the library's own decoder wrong --------------------
# Each case runs against our codec and against gsmmodem.pdu.decodeSmsPdu. The library runs must
# fail (strict xfail): a release that fixes one turns red here, the cue to retire our part.


def _vector(name: str) -> dict[str, Any]:
    return next(v for v in VECTORS if v["name"] == name)


def _deliver(dcs: int, ud: bytes, udl: int, udhi: bool = False) -> str:
    first = 0x44 if udhi else 0x04
    return (
        (
            bytes.fromhex("07914477870561F0")
            + bytes((first,))
            + bytes.fromhex("0B914477009001F2")
            + bytes((0, dcs))
            + bytes.fromhex("42209212634000")
            + bytes((udl,))
            + ud
        )
        .hex()
        .upper()
    )


DEFECTS = {
    # 1. 16-bit concatenation header: fill bits miscounted, first character lost.
    "concat16_first_char": (
        encode_deliver("+1555", "What's up? " * 20, ref=300, ref_bits=16)[0],
        "What's up? " * 13 + "What's up",
    ),
    "concat16_published": (
        _vector("nodepdu_concat16_part1")["pdu"],
        _vector("nodepdu_concat16_part1")["expected"]["text"],
    ),
    # 2. Characters outside the BMP come back as lone surrogates.
    "emoji": (encode_deliver("+1555", "ok 😀")[0], "ok 😀"),
    "emoji_published": (
        _vector("chandongle_emoji_ucs2_surrogates")["pdu"],
        _vector("chandongle_emoji_ucs2_surrogates")["expected"]["text"],
    ),
    # 3. § at 0x5F decodes as a backtick.
    "section_sign": (encode_deliver("+1555", "§ 12")[0], "§ 12"),
    # 4. DCS groups other than 00xx read as GSM 7-bit: F4 is 8-bit data, class 0.
    "dcs_f4_8bit": (_deliver(0xF4, b"AB\x00\xff", 4), "AB\x00\xff"),
    "dcs_e8_ucs2_mwi": (_deliver(0xE8, "Привет".encode("utf-16-be"), 12), "Привет"),
    # 5. An escape followed by an undefined code is dropped: TS 23.038 shows the base character.
    "unknown_escape": (_deliver(0x00, pack_septets(bytes([0x41, 0x1B, 0x42, 0x43])), 4), "ABC"),
    "escape_escape": (_deliver(0x00, pack_septets(bytes([0x41, 0x1B, 0x1B, 0x43])), 4), "A C"),
    # 6. Septets counted in octets: a final @ is lost; an escaped form feed is never decoded.
    "final_at": (encode_deliver("+1555", "hello @@")[0], "hello @@"),
    "form_feed": (encode_deliver("+1555", "a\x0cb")[0], "a\x0cb"),
}


def test_octets_past_the_user_data_length_are_ignored_and_noted() -> None:
    sms = decode_deliver(_deliver(0x00, pack_septets(b"\x48\x49") + b"\x41\x41", 2))
    assert sms.text == "HI" and "octets past the user-data length ignored" in sms.notes


@pytest.mark.parametrize("case", list(DEFECTS))
def test_library_defects_are_fixed_here(case: str) -> None:
    pdu, expected = DEFECTS[case]
    assert ours(pdu) == expected


@pytest.mark.parametrize("case", list(DEFECTS))
@pytest.mark.xfail(reason="python-gsmmodem-new 0.13 decodes this wrong (shared/notes)", strict=True)
def test_library_decoder_fails_the_same_cases(case: str) -> None:
    pdu, expected = DEFECTS[case]
    assert library(pdu) == expected


def test_udh_with_other_elements_before_concat() -> None:
    udh = build_udh([(0x05, bytes.fromhex("0B8423F0")), concat_element(7, 2, 1)])
    septets = b"hello".decode("ascii").encode("gsm03.38")
    ud = udh + pack_septets(septets, (7 - len(udh) * 8 % 7) % 7)
    sms = decode_deliver(_deliver(0x00, ud, -(-len(udh) * 8 // 7) + 5, udhi=True))
    assert sms.text == "hello" and sms.concat is not None and (sms.concat.ref, sms.concat.seq) == (7, 1)
