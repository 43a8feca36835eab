"""Delivery receipts as SMSCs send them, read by ``controller.sender.receipts``.

Each receipt is built with the project's SMPP codec and read back through it, so the parser sees
exactly what a session hands it: a decoded ``smpplib`` deliver_sm with bytes fields.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from controller.sender import smpp_wire
from controller.sender.receipts import (
    DeliveryReceipt,
    ReceiptError,
    is_receipt,
    message_id_forms,
    normalise_message_id,
    parse_receipt,
    parse_receipt_date,
    parse_receipt_text,
)


def deliver_sm(text: str | bytes = b"", *, esm_class: int = 0x04, data_coding: int = 0, **tlvs: Any) -> Any:
    """A deliver_sm as it arrives: encoded by the codec, then decoded again."""
    body = text.encode("latin-1") if isinstance(text, str) else text
    pdu = smpp_wire.make(
        "deliver_sm",
        smpp_wire.Sequencer(),
        source_addr="447700900001",
        destination_addr="PROBE",
        esm_class=esm_class,
        data_coding=data_coding,
        short_message=body,
        **tlvs,
    )
    return smpp_wire.decode(smpp_wire.encode(pdu))


def matches(receipt: DeliveryReceipt, message_id: str) -> bool:
    """How the sender matches a receipt to the id its submit_sm_resp gave."""
    return normalise_message_id(message_id) in (receipt.message_id, *receipt.message_id_alternatives)


def test_smpp_34_appendix_b_format() -> None:
    # The receipt format of the SMPP 3.4 specification, Appendix B ("id:IIIIIIIIII sub:SSS
    # dlvrd:DDD submit date:YYMMDDhhmm done date:YYMMDDhhmm stat:DDDDDDD err:E Text: ..."),
    # filled in with our values; note the capital "Text:" as the appendix writes it.
    receipt = parse_receipt(
        deliver_sm(
            "id:0123456789 sub:001 dlvrd:001 submit date:2611251830 done date:2611251831"
            " stat:DELIVRD err:000 Text:Hello from the probe"
        )
    )
    assert receipt.message_id == "0123456789"
    assert receipt.source == "text"
    assert receipt.stat == "DELIVRD"
    assert receipt.err == "000"
    assert (receipt.sub, receipt.dlvrd) == (1, 1)
    assert receipt.submit_date == datetime(2026, 11, 25, 18, 30, tzinfo=UTC)
    assert receipt.done_date == datetime(2026, 11, 25, 18, 31, tzinfo=UTC)
    assert receipt.text == "Hello from the probe"
    assert receipt.message_state is None
    # an all-digit id may be the decimal form of a hex id, or hex itself
    assert "75bcd15" in receipt.message_id_alternatives  # 123456789 in hex
    assert "123456789" in receipt.message_id_alternatives  # leading zero lost


def test_twelve_digit_dates_with_seconds() -> None:
    receipt = parse_receipt(
        deliver_sm(
            "id:a1b2c3 sub:001 dlvrd:001 submit date:261125183005 done date:261125183107"
            " stat:DELIVRD err:000 text:"
        )
    )
    assert receipt.submit_date == datetime(2026, 11, 25, 18, 30, 5, tzinfo=UTC)
    assert receipt.done_date == datetime(2026, 11, 25, 18, 31, 7, tzinfo=UTC)
    assert receipt.text == ""


def test_hex_id_in_tlv_decimal_id_in_text() -> None:
    # Some SMSCs answer submit_sm_resp with a hex id and write its decimal value in the text.
    hex_id = "fc8700000001"
    decimal_id = str(int(hex_id, 16))
    receipt = parse_receipt(
        deliver_sm(
            f"id:{decimal_id} sub:001 dlvrd:001 submit date:2611251830 done date:2611251830"
            " stat:DELIVRD err:000",
            receipted_message_id=hex_id,
            message_state=2,
        )
    )
    assert receipt.message_id == hex_id
    assert receipt.source == "tlv"
    assert decimal_id in receipt.message_id_alternatives
    assert receipt.message_state == 2


def test_decimal_id_in_text_only_matches_the_hex_submit_id() -> None:
    hex_id = "FC8700000001"  # as some SMSCs spell it in submit_sm_resp
    receipt = parse_receipt(deliver_sm(f"id:{int(hex_id, 16)} stat:DELIVRD err:000"))
    assert receipt.source == "text"
    assert matches(receipt, hex_id)


def test_hex_id_in_text_matches_a_decimal_submit_id() -> None:
    receipt = parse_receipt(deliver_sm("id:3ADE68B1 stat:DELIVRD"))
    assert receipt.message_id == "3ade68b1"
    assert matches(receipt, str(0x3ADE68B1))
    assert matches(receipt, "3ADE68B1")


def test_tlv_only_receipt_with_empty_text() -> None:
    receipt = parse_receipt(deliver_sm(b"", receipted_message_id="abc-123-XYZ", message_state=5))
    assert receipt.message_id == "abc-123-XYZ"  # not hex: kept as is
    assert receipt.source == "tlv"
    assert receipt.stat == "UNDELIV"
    assert receipt.err is None
    assert receipt.submit_date is None and receipt.done_date is None
    assert receipt.message_id_alternatives == ()


@pytest.mark.parametrize(
    ("state", "stat"),
    [
        (1, "ENROUTE"),
        (2, "DELIVRD"),
        (3, "EXPIRED"),
        (4, "DELETED"),
        (5, "UNDELIV"),
        (6, "ACCEPTD"),
        (7, "UNKNOWN"),
        (8, "REJECTD"),
    ],
)
def test_message_state_gives_the_stat_when_the_text_has_none(state: int, stat: str) -> None:
    receipt = parse_receipt(deliver_sm(b"", receipted_message_id="42", message_state=state))
    assert receipt.stat == stat


def test_text_stat_is_kept_beside_message_state() -> None:
    receipt = parse_receipt(deliver_sm("id:42 stat:EXPIRED", receipted_message_id="42", message_state=2))
    assert receipt.stat == "EXPIRED"
    assert receipt.message_state == 2


def test_uppercase_and_mixed_field_names_in_any_order() -> None:
    receipt = parse_receipt(
        deliver_sm(
            "Stat:undeliv ERR:0B1 ID:9f2c SUB:001 Dlvrd:000 SUBMIT_DATE:2611251830"
            " Done_Date:2611251845 TEXT:Hi"
        )
    )
    assert receipt.message_id == "9f2c"
    assert receipt.stat == "UNDELIV"
    assert receipt.err == "0B1"  # hex, as some SMSCs write the network error
    assert receipt.dlvrd == 0
    assert receipt.submit_date == datetime(2026, 11, 25, 18, 30, tzinfo=UTC)
    assert receipt.done_date == datetime(2026, 11, 25, 18, 45, tzinfo=UTC)
    assert receipt.text == "Hi"


def test_text_field_may_contain_other_field_names() -> None:
    receipt = parse_receipt(
        deliver_sm(
            "id:77 sub:001 dlvrd:001 submit date:2611251830 done date:2611251830 stat:DELIVRD err:000"
            " text:stat:UNDELIV id:99 err:123"
        )
    )
    assert receipt.message_id == "77"
    assert receipt.stat == "DELIVRD"
    assert receipt.err == "000"
    assert receipt.text == "stat:UNDELIV id:99 err:123"


def test_unknown_fields_are_ignored() -> None:
    receipt = parse_receipt(deliver_sm("msgid:zzz id:5 route:eu-1 stat:DELIVRD err:0 price:0.01 text:x"))
    assert receipt.message_id == "5"
    assert receipt.stat == "DELIVRD"
    assert receipt.err == "0"


def test_long_stat_spellings_and_unknown_ones() -> None:
    assert parse_receipt(deliver_sm("id:1 stat:Delivered")).stat == "DELIVRD"
    assert parse_receipt(deliver_sm("id:1 stat:REJECTED")).stat == "REJECTD"
    assert parse_receipt(deliver_sm("id:1 stat:WHATEVER")).stat == "UNKNOWN"
    assert parse_receipt(deliver_sm("id:1")).stat == "UNKNOWN"


def test_aiosmpplib_failure_modes_do_not_hurt() -> None:
    # notes/smpp.md item 7: aiosmpplib 0.7.4 raises on a 12-digit date and on a non-decimal err:,
    # inside its read loop. Both are ordinary receipts here.
    receipt = parse_receipt(
        deliver_sm(
            "id:0a1b2c3d sub:001 dlvrd:000 submit date:261125183005 done date:261125183959"
            " stat:UNDELIV err:0FF text:Test message"
        )
    )
    assert receipt.message_id == "0a1b2c3d"
    assert receipt.stat == "UNDELIV"
    assert receipt.err == "0FF"
    assert receipt.done_date == datetime(2026, 11, 25, 18, 39, 59, tzinfo=UTC)


def test_ucs2_receipt_text() -> None:
    receipt = parse_receipt(deliver_sm("id:ab12 stat:DELIVRD".encode("utf-16-be"), data_coding=8))
    assert (receipt.message_id, receipt.stat) == ("ab12", "DELIVRD")


def test_bad_dates_are_none_not_errors() -> None:
    receipt = parse_receipt(deliver_sm("id:1 submit date:2613991299 done date:26 stat:DELIVRD"))
    assert receipt.submit_date is None and receipt.done_date is None
    assert parse_receipt_date("20261125183005") == datetime(2026, 11, 25, 18, 30, 5, tzinfo=UTC)
    assert parse_receipt_date("abc") is None


@pytest.mark.parametrize(
    "pdu",
    [
        deliver_sm("sub:001 dlvrd:001 stat:DELIVRD err:000 text:no id here"),
        deliver_sm(b""),
        deliver_sm(b"\xff\xfe\x00garbage"),
        deliver_sm("id: stat:DELIVRD"),
        SimpleNamespace(short_message=12345, esm_class=4),
        SimpleNamespace(),
        None,
    ],
)
def test_no_usable_id_raises_receipt_error_only(pdu: Any) -> None:
    with pytest.raises(ReceiptError) as caught:
        parse_receipt(pdu)
    assert caught.value.reason
    assert isinstance(caught.value, ValueError)


def test_is_receipt() -> None:
    assert is_receipt(deliver_sm("id:1", esm_class=0x04))
    assert is_receipt(deliver_sm("id:1", esm_class=0x08))
    assert is_receipt(deliver_sm("id:1", esm_class=0x20))  # intermediate delivery notification
    assert not is_receipt(deliver_sm("hello", esm_class=0x00))
    assert not is_receipt(deliver_sm(b"\x05\x00\x03\x01\x02\x01hi", esm_class=0x40))  # MO with UDH
    assert is_receipt(deliver_sm(b"", esm_class=0x00, receipted_message_id="1"))


def test_parse_receipt_text_fields() -> None:
    fields = parse_receipt_text(
        "id:X1 sub:001 dlvrd:001 submit_date:2611251830 done date:2611251830 stat:DELIVRD"
    )
    assert fields == {
        "id": "X1",
        "sub": "001",
        "dlvrd": "001",
        "submit_date": "2611251830",
        "done_date": "2611251830",
        "stat": "DELIVRD",
    }
    assert parse_receipt_text("") == {}
    assert parse_receipt_text("id:1 id:2")["id"] == "1"


def test_message_id_forms() -> None:
    assert normalise_message_id(" 0A1B\x00") == "0a1b"
    assert message_id_forms("0A1B") == ("0A1B", str(0x0A1B), "a1b")
    assert message_id_forms("msg-1") == ()


def _without_nul(pdu_bytes: bytes, value: bytes) -> bytes:
    """The PDU with its receipted_message_id TLV rewritten without the trailing NUL, as some
    SMSCs send it (the spec says C-octet string; they send the bare octets)."""
    tlv = (0x001E).to_bytes(2, "big") + (len(value) + 1).to_bytes(2, "big") + value + b"\x00"
    bare = (0x001E).to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
    assert tlv in pdu_bytes
    out = pdu_bytes.replace(tlv, bare)
    return len(out).to_bytes(4, "big") + out[4:]


def test_receipted_message_id_without_its_nul_keeps_every_character() -> None:
    """smpplib reads a C-string TLV as length - 1 bytes: without the NUL it would report "4F2A1"
    for "4F2A1C". The codec re-reads the raw TLV of deliver_sm; with the NUL nothing changes."""
    import smpplib.smpp

    pdu = smpp_wire.make(
        "deliver_sm",
        smpp_wire.Sequencer(),
        source_addr="447700900001",
        destination_addr="PROBE",
        esm_class=0x04,
        short_message=b"id:4F2A1C stat:DELIVRD",
        receipted_message_id="4F2A1C",
        message_state=2,
    )
    data = _without_nul(smpp_wire.encode(pdu), b"4F2A1C")
    library = smpplib.smpp.parse_pdu(data, client=smpp_wire.Sequencer(), allow_unknown_opt_params=True)
    assert library.receipted_message_id == b"4F2A1"  # the library's reading, one character short
    ours = smpp_wire.decode(data)
    assert ours.receipted_message_id == b"4F2A1C" and ours.message_state == 2
    assert parse_receipt(ours).message_id == "4f2a1c"  # ids are compared in lower case
    assert smpp_wire.decode(smpp_wire.encode(pdu)).receipted_message_id == b"4F2A1C"  # with its NUL


def test_deliver_sm_tlvs_of_a_truncated_body_is_empty_not_an_error() -> None:
    pdu = smpp_wire.encode(
        smpp_wire.make(
            "deliver_sm", smpp_wire.Sequencer(), short_message=b"id:1 stat:DELIVRD", receipted_message_id="1"
        )
    )
    assert smpp_wire.deliver_sm_tlvs(pdu)[0x001E] == b"1\x00"
    assert smpp_wire.deliver_sm_tlvs(pdu[:20]) == {}
