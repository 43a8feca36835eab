"""Delivery receipts (DLRs) read defensively, as real SMSCs send them.

SMPP 3.4 Appendix B suggests a receipt text (``id:... sub:... dlvrd:... submit date:... done
date:... stat:... err:... text:...``) but does not mandate it, and SMSCs differ: 10- or 12-digit
dates, ``err:`` in decimal or hex, field names in any case, ``submit_date`` for ``submit date``,
the message id in decimal where ``submit_sm_resp`` gave it in hex, empty text with the id only
in the ``receipted_message_id`` TLV. The TLVs, when present, win over the text (see
``notes/smpp.md``). A receipt that cannot be read raises ``ReceiptError`` and nothing else, so
the session can acknowledge it and carry on rather than drop the link.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

log = logging.getLogger(__name__)

#: esm_class message types (bits 5..2) that carry a receipt: SMSC delivery receipt (0x04), SME
#: delivery acknowledgement (0x08), intermediate delivery notification (0x20).
RECEIPT_ESM_TYPES = frozenset({0x04, 0x08, 0x20})
ESM_TYPE_MASK = 0x3C

#: The receipt states (``stat:``) of SMPP 3.4 Appendix B.
STATS = frozenset({"DELIVRD", "UNDELIV", "EXPIRED", "DELETED", "REJECTD", "ACCEPTD", "UNKNOWN", "ENROUTE"})
#: message_state TLV (0x0427) values, SMPP 3.4 section 5.2.28.
MESSAGE_STATE_STATS: dict[int, str] = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
#: Spellings seen in the wild for the standard states.
_STAT_ALIASES: dict[str, str] = {
    "DELIVERED": "DELIVRD",
    "UNDELIVERED": "UNDELIV",
    "UNDELIVERABLE": "UNDELIV",
    "REJECTED": "REJECTD",
    "ACCEPTED": "ACCEPTD",
    "EXPIRD": "EXPIRED",
    "DELETD": "DELETED",
}

#: A field name of the receipt text, matched in any case, not as the tail of a longer word.
_FIELD = re.compile(r"(?<![A-Za-z0-9_])(id|sub|dlvrd|submit[ _]?date|done[ _]?date|stat|err|text)\s*:", re.I)
_HEX = re.compile(r"[0-9A-Fa-f]+")


class ReceiptError(ValueError):
    """A receipt that cannot be used (no message id); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DeliveryReceipt:
    """One delivery receipt, normalised."""

    message_id: str
    #: Other spellings of the id to match a submit_sm_resp against (hex / decimal forms).
    message_id_alternatives: tuple[str, ...]
    stat: str
    err: str | None
    submit_date: datetime | None
    done_date: datetime | None
    dlvrd: int | None
    sub: int | None
    text: str | None
    #: Where the id came from: the ``receipted_message_id`` TLV or the ``id:`` of the text.
    source: Literal["tlv", "text"]
    message_state: int | None
    #: The ``network_error_code`` TLV (type, then a 2-octet code), when sent.
    network_error_code: bytes | None = None
    #: The receipt's text as received.
    raw_text: str = ""


def parse_receipt_text(text: str) -> dict[str, str]:
    """The fields of a receipt text, by canonical name (``id``, ``sub``, ``dlvrd``,
    ``submit_date``, ``done_date``, ``stat``, ``err``, ``text``), as strings.

    Names match in any case and order; unknown fields are skipped; a value is the first word after
    its name (``text`` takes everything to the end, so a ``stat:`` inside it is not a field); the
    first occurrence of a field wins. Never raises.
    """
    fields: dict[str, str] = {}
    matches = list(_FIELD.finditer(text))
    for index, match in enumerate(matches):
        name = re.sub(r"[ _]?date$", "_date", match.group(1).lower())
        if name == "text":
            fields.setdefault("text", text[match.end() :])
            break
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        words = text[match.end() : end].split()
        if words and name not in fields:
            fields[name] = words[0]
    return fields


def parse_receipt_date(value: str | None) -> datetime | None:
    """``YYMMDDhhmm``, ``YYMMDDhhmmss`` or ``YYYYMMDDhhmmss`` as UTC; None when unreadable."""
    if not value or not value.isdigit():
        return None
    formats = {10: "%y%m%d%H%M", 12: "%y%m%d%H%M%S", 14: "%Y%m%d%H%M%S"}
    fmt = formats.get(len(value))
    if fmt is None:
        return None
    try:
        return datetime.strptime(value, fmt).replace(tzinfo=UTC)
    except ValueError:
        return None


def normalise_message_id(message_id: str) -> str:
    """An SMSC message id as matched: stripped of blanks and NULs, lower case when it is hex."""
    cleaned = message_id.strip().strip("\x00").strip()
    return cleaned.lower() if _HEX.fullmatch(cleaned) else cleaned


def message_id_forms(message_id: str) -> tuple[str, ...]:
    """Other spellings of an SMSC message id: an all-digit id may be the decimal value of a hex
    id or a hex id itself; a hex id may be written in decimal; leading zeros may be lost."""
    original = message_id.strip().strip("\x00").strip()
    normal = normalise_message_id(original)
    forms: list[str] = [original]
    if normal.isdigit():
        forms.append(format(int(normal), "x"))
    if _HEX.fullmatch(normal):
        forms.append(str(int(normal, 16)))
        stripped = normal.lstrip("0")
        if stripped:
            forms.append(stripped)
    unique: list[str] = []
    for form in forms:
        if form and form != normal and form not in unique:
            unique.append(form)
    return tuple(unique)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _stat(value: str | None) -> str | None:
    if not value:
        return None
    stat = value.upper()
    stat = _STAT_ALIASES.get(stat, stat)
    return stat if stat in STATS else "UNKNOWN"


def _receipt_body(pdu: Any) -> str:
    """The receipt text of a deliver_sm / data_sm, from short_message or message_payload."""
    raw = getattr(pdu, "short_message", None) or getattr(pdu, "message_payload", None) or b""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ReceiptError(f"the receipt body is a {type(raw).__name__}, not bytes")
    if getattr(pdu, "data_coding", None) == 0x08:
        return bytes(raw).decode("utf-16-be", errors="replace")
    return bytes(raw).decode("latin-1")


def is_receipt(pdu: Any) -> bool:
    """True when a deliver_sm / data_sm is a receipt: its esm_class says so, or it names the
    message it reports on (``receipted_message_id``)."""
    esm_class = getattr(pdu, "esm_class", None)
    if isinstance(esm_class, int) and esm_class & ESM_TYPE_MASK in RECEIPT_ESM_TYPES:
        return True
    return bool(_text(getattr(pdu, "receipted_message_id", None)).strip("\x00 "))


def parse_receipt(pdu: Any) -> DeliveryReceipt:
    """The receipt carried by a decoded deliver_sm / data_sm (an ``smpplib`` command).

    ``receipted_message_id`` wins over the text's ``id:``; ``message_state`` gives the stat when
    the text has none. ``ReceiptError`` when there is no usable message id; never anything else.
    """
    try:
        return _parse(pdu)
    except ReceiptError:
        raise
    except Exception as exc:  # whatever a malformed PDU does to us, the session only sees ReceiptError
        raise ReceiptError(f"unreadable receipt ({type(exc).__name__}: {exc})") from exc


def _parse(pdu: Any) -> DeliveryReceipt:
    body = _receipt_body(pdu)
    fields = parse_receipt_text(body)
    tlv_id = normalise_message_id(_text(getattr(pdu, "receipted_message_id", None)))
    text_id = normalise_message_id(fields.get("id", ""))
    source: Literal["tlv", "text"]
    if tlv_id:
        message_id, source = tlv_id, "tlv"
    elif text_id:
        message_id, source = text_id, "text"
    else:
        raise ReceiptError(f"no message id in receipted_message_id nor in the text {body[:80]!r}")
    state = getattr(pdu, "message_state", None)
    message_state = state if isinstance(state, int) else None
    stat = _stat(fields.get("stat"))
    if stat is None:
        stat = MESSAGE_STATE_STATS.get(message_state, "UNKNOWN") if message_state is not None else "UNKNOWN"
    alternatives = list(message_id_forms(message_id))
    if source == "tlv" and text_id and text_id != message_id:
        alternatives.extend(f for f in (text_id, *message_id_forms(text_id)) if f not in alternatives)
    network_error = getattr(pdu, "network_error_code", None)
    return DeliveryReceipt(
        message_id=message_id,
        message_id_alternatives=tuple(a for a in alternatives if a != message_id),
        stat=stat,
        err=fields.get("err"),
        submit_date=parse_receipt_date(fields.get("submit_date")),
        done_date=parse_receipt_date(fields.get("done_date")),
        dlvrd=_number(fields.get("dlvrd")),
        sub=_number(fields.get("sub")),
        text=fields.get("text"),
        source=source,
        message_state=message_state,
        network_error_code=network_error if isinstance(network_error, bytes) and network_error else None,
        raw_text=body,
    )


__all__ = [
    "STATS",
    "DeliveryReceipt",
    "ReceiptError",
    "is_receipt",
    "message_id_forms",
    "normalise_message_id",
    "parse_receipt",
    "parse_receipt_date",
    "parse_receipt_text",
]
