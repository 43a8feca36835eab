"""SMS TPDU codec (3GPP TS 23.040 / 23.038): decode SMS-DELIVER, encode SMS-DELIVER.

One module, both directions: the virtual modem encodes what the agent decodes. We own it because
python-gsmmodem-new's decoder is measured wrong on real PDUs (see ``shared/notes``): 16-bit
concatenation fill bits, emoji as lone surrogates, ``§``, non-00xx data-coding groups, septet
counts. Character tables come from the maintained ``gsm0338`` codec; septet packing, header
fields and the user-data header are small enough to own and are tested against published vectors.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

GSM7 = "gsm03.38"
ESC = 0x1B

#: Information element identifiers we interpret (TS 23.040 §9.2.3.24).
IEI_CONCAT_8 = 0x00
IEI_CONCAT_16 = 0x08
IEI_NATIONAL_SINGLE_SHIFT = 0x24
IEI_NATIONAL_LOCKING_SHIFT = 0x25

#: Single-part capacities, and per-part capacities once a concatenation header is present.
GSM7_SINGLE_SEPTETS = 160
UCS2_SINGLE_OCTETS = 140
MAX_UD_OCTETS = 140


class PduError(ValueError):
    """A PDU that cannot be decoded or encoded; the message says which field and why."""


class Alphabet(enum.StrEnum):
    """Character set of the user data (TS 23.038 §4)."""

    GSM7 = "gsm7"
    DATA_8BIT = "8bit"
    UCS2 = "ucs2"


class TypeOfNumber(enum.IntEnum):
    """TON bits of an address's type-of-address octet (TS 23.040 §9.1.2.5)."""

    UNKNOWN = 0
    INTERNATIONAL = 1
    NATIONAL = 2
    NETWORK_SPECIFIC = 3
    SUBSCRIBER = 4
    ALPHANUMERIC = 5
    ABBREVIATED = 6
    RESERVED = 7


@dataclass(frozen=True, slots=True)
class Address:
    """A phone number or alphanumeric sender as carried in the PDU."""

    value: str
    ton: TypeOfNumber = TypeOfNumber.UNKNOWN
    npi: int = 1

    @property
    def toa(self) -> int:
        """The type-of-address octet."""
        return 0x80 | (int(self.ton) << 4) | (self.npi & 0x0F)

    @property
    def type_name(self) -> str:
        """``international``, ``national``, ``alphanumeric``... as a readable label."""
        return self.ton.name.lower()

    @classmethod
    def parse(cls, text: str) -> Address:
        """Address from a human string: ``+4477...`` international, digits unknown, else alphanumeric."""
        if text.startswith("+") and text[1:].isdigit() and len(text) > 1:
            return cls(text, TypeOfNumber.INTERNATIONAL)
        if text and all(c in "0123456789*#" for c in text):
            return cls(text, TypeOfNumber.UNKNOWN)
        return cls(text, TypeOfNumber.ALPHANUMERIC, 0)


@dataclass(frozen=True, slots=True)
class DataCoding:
    """The meaning of a TP-DCS octet (TS 23.038 §4)."""

    dcs: int
    alphabet: Alphabet
    message_class: int | None = None
    compressed: bool = False
    auto_delete: bool = False
    #: Message-waiting group: (store, active, indication type), else None.
    message_waiting: tuple[bool, bool, int] | None = None

    @classmethod
    def parse(cls, dcs: int) -> DataCoding:
        """Interpret every coding group, not just 00xx; reserved groups mean GSM 7-bit."""
        group = dcs >> 4
        if group < 0x8:  # 00xx general, 01xx automatic deletion: same bit layout
            alphabet = _ALPHABET_BITS.get((dcs >> 2) & 0x03, Alphabet.GSM7)
            return cls(
                dcs,
                alphabet,
                message_class=(dcs & 0x03) if dcs & 0x10 else None,
                compressed=bool(dcs & 0x20),
                auto_delete=bool(group & 0x4),
            )
        if group in (0xC, 0xD, 0xE):  # message waiting: discard / store GSM7 / store UCS2
            return cls(
                dcs,
                Alphabet.UCS2 if group == 0xE else Alphabet.GSM7,
                message_waiting=(group != 0xC, bool(dcs & 0x08), dcs & 0x03),
            )
        if group == 0xF:  # data coding / message class
            return cls(dcs, Alphabet.DATA_8BIT if dcs & 0x04 else Alphabet.GSM7, dcs & 0x03)
        return cls(dcs, Alphabet.GSM7)  # 1000..1011 reserved: "assumed GSM 7 bit default"


_ALPHABET_BITS = {0: Alphabet.GSM7, 1: Alphabet.DATA_8BIT, 2: Alphabet.UCS2}


@dataclass(frozen=True, slots=True)
class Concat:
    """Concatenation information element: part ``seq`` of ``total`` of message ``ref``."""

    ref: int
    total: int
    seq: int
    ref_bits: int


@dataclass(frozen=True, slots=True)
class SmsDeliver:
    """One decoded SMS-DELIVER part."""

    smsc: Address | None
    sender: Address
    pid: int
    coding: DataCoding
    scts: datetime
    #: User data after the header: one septet per byte for GSM 7-bit, else the octets.
    units: bytes
    #: Every information element of the user-data header, in order.
    udh: tuple[tuple[int, bytes], ...] = ()
    more_messages: bool = False
    reply_path: bool = False
    status_report_indication: bool = False
    pdu: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def concat(self) -> Concat | None:
        """The concatenation header when valid; an invalid one is ignored as TS 23.040 asks."""
        for iei, data in self.udh:
            if iei == IEI_CONCAT_8 and len(data) == 3:
                ref, total, seq, bits = data[0], data[1], data[2], 8
            elif iei == IEI_CONCAT_16 and len(data) == 4:
                ref, total, seq, bits = (data[0] << 8) | data[1], data[2], data[3], 16
            else:
                continue
            if total >= 1 and 1 <= seq <= total:
                return Concat(ref, total, seq, bits)
        return None

    @property
    def text(self) -> str:
        """This part's text alone (concatenated messages join ``units`` before decoding)."""
        return decode_units(self.coding.alphabet, self.units)

    @property
    def is_flash(self) -> bool:
        """Class 0: shown at once and not stored by a handset."""
        return self.coding.message_class == 0

    @property
    def is_silent(self) -> bool:
        """PID 0x40, the short message type 0 that a handset acknowledges and discards."""
        return self.pid == 0x40

    @property
    def replace_type(self) -> int | None:
        """1..7 for the replace-short-message PIDs 0x41..0x47, else None."""
        return self.pid - 0x40 if 0x41 <= self.pid <= 0x47 else None

    @property
    def language_shift(self) -> tuple[int | None, int | None]:
        """National language (single shift, locking shift) tables asked for by the header."""
        single = locking = None
        for iei, data in self.udh:
            if iei == IEI_NATIONAL_SINGLE_SHIFT and data:
                single = data[0]
            elif iei == IEI_NATIONAL_LOCKING_SHIFT and data:
                locking = data[0]
        return single, locking


# --- septets ---------------------------------------------------------------------------------


def pack_septets(septets: bytes, fill_bits: int = 0) -> bytes:
    """Pack 7-bit values into octets, least significant bit first, after ``fill_bits`` zeros."""
    acc = 0
    nbits = fill_bits
    out = bytearray()
    for s in septets:
        acc |= (s & 0x7F) << nbits
        nbits += 7
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def unpack_septets(octets: bytes, count: int, skip_bits: int = 0) -> bytes:
    """Exactly ``count`` septets from packed octets, starting ``skip_bits`` into them."""
    needed = math.ceil((skip_bits + count * 7) / 8)
    if needed > len(octets):
        raise PduError(f"user data holds {len(octets)} octets, {needed} needed for {count} septets")
    value = int.from_bytes(octets[:needed], "little") >> skip_bits
    return bytes((value >> (7 * i)) & 0x7F for i in range(count))


def gsm7_encode(text: str) -> bytes:
    """Text as GSM 7-bit septets (extension characters take two); UnicodeEncodeError if not GSM."""
    return text.encode(GSM7)


def is_gsm7(text: str) -> bool:
    """Whether the text fits the GSM 7-bit default alphabet and its extension table."""
    try:
        text.encode(GSM7)
    except UnicodeEncodeError:
        return False
    return True


def gsm7_decode(septets: bytes) -> str:
    """Septets to text. An escape to an undefined extension code shows the default-table
    character, and a final lone escape a space, as TS 23.038 §6.2.1.1 asks."""
    out: list[str] = []
    i = 0
    n = len(septets)
    while i < n:
        s = septets[i]
        if s == ESC:
            if i + 1 >= n:
                out.append(" ")
                break
            pair = bytes((ESC, septets[i + 1]))
            try:
                out.append(pair.decode(GSM7))
            except UnicodeDecodeError:
                # ESC ESC has no default-table glyph either: a space, as for a lone escape.
                code = septets[i + 1]
                out.append(" " if code == ESC else bytes((code,)).decode(GSM7))
            i += 2
            continue
        out.append(bytes((s,)).decode(GSM7))
        i += 1
    return "".join(out)


def decode_units(alphabet: Alphabet, units: bytes) -> str:
    """Text from user-data units. UCS2 is UTF-16BE so emoji (surrogate pairs) come out whole;
    a broken pair or odd octet becomes U+FFFD, never a lone surrogate. 8-bit data has no
    character set; it is shown as ISO-8859-1 (the octets stay in ``units``)."""
    if alphabet is Alphabet.GSM7:
        return gsm7_decode(units)
    if alphabet is Alphabet.UCS2:
        return units.decode("utf-16-be", errors="replace")
    return units.decode("latin-1")


# --- semi-octets, addresses, timestamps --------------------------------------------------------

_BCD_DIGITS = "0123456789*#abc"


def _decode_bcd(octets: bytes, digits: int) -> str:
    out = []
    for b in octets:
        for nibble in (b & 0x0F, b >> 4):
            if nibble == 0x0F:
                continue
            out.append(_BCD_DIGITS[nibble])
    return "".join(out)[:digits]


def _encode_bcd(digits: str) -> bytes:
    values = [_BCD_DIGITS.index(c) for c in digits]
    if len(values) % 2:
        values.append(0x0F)
    return bytes(values[i] | (values[i + 1] << 4) for i in range(0, len(values), 2))


def _decode_alphanumeric(octets: bytes, semi_octets: int) -> str:
    septets = unpack_septets(octets, (semi_octets * 4) // 7)
    return gsm7_decode(septets)


def encode_address(address: Address) -> bytes:
    """An originating/destination address field: length in semi-octets, type, value."""
    if address.ton is TypeOfNumber.ALPHANUMERIC:
        septets = gsm7_encode(address.value)
        if len(septets) > 11:
            raise PduError(f"alphanumeric sender {address.value!r} is longer than 11 characters")
        packed = pack_septets(septets)
        return bytes((math.ceil(len(septets) * 7 / 4), address.toa)) + packed
    digits = address.value.lstrip("+")
    if not digits or any(c not in _BCD_DIGITS for c in digits) or len(digits) > 20:
        raise PduError(f"address {address.value!r} is not a number of 1 to 20 digits")
    return bytes((len(digits), address.toa)) + _encode_bcd(digits)


def _format_number(digits: str, ton: TypeOfNumber) -> str:
    return "+" + digits if ton is TypeOfNumber.INTERNATIONAL and digits else digits


def encode_smsc(smsc: str | None) -> bytes:
    """The SMSC information that precedes the TPDU in +CMGR output (length in octets)."""
    if not smsc:
        return b"\x00"
    address = Address.parse(smsc)
    body = encode_address(address)[1:]
    return bytes((len(body),)) + body


def decode_scts(octets: bytes) -> datetime:
    """Service-centre timestamp: swapped semi-octets, the zone in quarter hours with a sign bit."""
    if len(octets) != 7:
        raise PduError("SCTS must be 7 octets")
    fields = []
    for b in octets[:6]:
        lo, hi = b & 0x0F, b >> 4
        if lo > 9 or hi > 9:
            raise PduError(f"SCTS octet {b:02X} is not two decimal digits")
        fields.append(lo * 10 + hi)
    tz = octets[6]
    lo, hi = tz & 0x07, tz >> 4
    if hi > 9:
        raise PduError(f"SCTS zone octet {tz:02X} is not decimal")
    quarters = lo * 10 + hi
    if tz & 0x08:
        quarters = -quarters
    yy, month, day, hour, minute, second = fields
    year = 2000 + yy if yy < 70 else 1900 + yy
    try:
        return datetime(
            year,
            month,
            day,
            hour,
            minute,
            second,
            tzinfo=timezone(timedelta(minutes=15 * quarters)),
        )
    except ValueError as exc:
        raise PduError(f"SCTS is not a valid time: {exc}") from None


def encode_scts(when: datetime) -> bytes:
    """A timezone-aware datetime as SCTS (the zone rounded to quarter hours)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise PduError("SCTS needs a timezone-aware datetime")
    offset = when.utcoffset()
    assert offset is not None
    quarters = round(offset.total_seconds() / 900)
    values = [when.year % 100, when.month, when.day, when.hour, when.minute, when.second]
    out = bytearray(((v % 10) << 4) | (v // 10) for v in values)
    q = abs(quarters)
    out.append(((q % 10) << 4) | (q // 10) | (0x08 if quarters < 0 else 0))
    return bytes(out)


# --- user-data header --------------------------------------------------------------------------


def parse_udh(header: bytes) -> tuple[tuple[int, bytes], ...]:
    """Information elements of a user-data header (without its length octet)."""
    elements = []
    i = 0
    while i < len(header):
        if i + 2 > len(header):
            raise PduError(f"user-data header ends inside an element at octet {i}")
        iei, length = header[i], header[i + 1]
        if i + 2 + length > len(header):
            raise PduError(f"information element {iei:02X} runs past the user-data header")
        elements.append((iei, bytes(header[i + 2 : i + 2 + length])))
        i += 2 + length
    return tuple(elements)


def build_udh(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """A user-data header with its length octet."""
    body = b"".join(bytes((iei, len(data))) + data for iei, data in elements)
    return bytes((len(body),)) + body


def concat_element(ref: int, total: int, seq: int, ref_bits: int = 8) -> tuple[int, bytes]:
    """The concatenation information element, 8- or 16-bit reference."""
    if ref_bits == 8:
        return IEI_CONCAT_8, bytes((ref & 0xFF, total, seq))
    if ref_bits == 16:
        return IEI_CONCAT_16, bytes(((ref >> 8) & 0xFF, ref & 0xFF, total, seq))
    raise PduError("concatenation reference must be 8 or 16 bits")


# --- SMS-DELIVER -------------------------------------------------------------------------------


def decode_deliver(pdu: str, *, has_smsc: bool = True) -> SmsDeliver:
    """Decode one SMS-DELIVER from hex, as ``AT+CMGR`` prints it in PDU mode."""
    try:
        raw = bytes.fromhex(pdu.strip())
    except ValueError:
        raise PduError("PDU is not hexadecimal") from None
    reader = _Reader(raw)
    smsc: Address | None = None
    if has_smsc:
        smsc_len = reader.take(1, "SMSC length")[0]
        if smsc_len:
            toa = reader.take(1, "SMSC type")[0]
            ton = TypeOfNumber((toa >> 4) & 0x07)
            digits = _decode_bcd(reader.take(smsc_len - 1, "SMSC address"), 2 * (smsc_len - 1))
            smsc = Address(_format_number(digits, ton), ton, toa & 0x0F)
    first = reader.take(1, "first octet")[0]
    if first & 0x03 != 0x00:
        raise PduError(f"not an SMS-DELIVER (message type indicator {first & 0x03})")
    oa_len = reader.take(1, "sender length")[0]
    oa_toa = reader.take(1, "sender type")[0]
    ton = TypeOfNumber((oa_toa >> 4) & 0x07)
    oa_octets = reader.take(math.ceil(oa_len / 2), "sender address")
    if ton is TypeOfNumber.ALPHANUMERIC:
        sender = Address(_decode_alphanumeric(oa_octets, oa_len), ton, oa_toa & 0x0F)
    else:
        sender = Address(_format_number(_decode_bcd(oa_octets, oa_len), ton), ton, oa_toa & 0x0F)
    pid = reader.take(1, "protocol identifier")[0]
    coding = DataCoding.parse(reader.take(1, "data coding scheme")[0])
    scts = decode_scts(reader.take(7, "service-centre timestamp"))
    udl = reader.take(1, "user-data length")[0]
    ud = reader.rest()
    notes: list[str] = []
    udh: tuple[tuple[int, bytes], ...] = ()
    header_octets = 0
    if first & 0x40:
        if not ud:
            raise PduError("user-data header indicated but user data is empty")
        header_octets = ud[0] + 1
        if header_octets > len(ud):
            raise PduError("user-data header is longer than the user data")
        udh = parse_udh(ud[1:header_octets])
    if coding.compressed:
        raise PduError("compressed user data (TS 23.042) is not supported")
    if coding.alphabet is Alphabet.GSM7:
        if udl > 160:
            raise PduError(f"user-data length {udl} septets exceeds 160")
        header_septets = math.ceil(header_octets * 8 / 7)
        if header_septets > udl:
            raise PduError("user-data length is shorter than its header")
        units = unpack_septets(ud, udl)[header_septets:]
        if len(ud) > math.ceil(udl * 7 / 8):
            notes.append("octets past the user-data length ignored")
    else:
        if udl > MAX_UD_OCTETS or udl > len(ud):
            raise PduError(f"user-data length {udl} octets but {len(ud)} present")
        if udl < header_octets:
            raise PduError("user-data length is shorter than its header")
        units = ud[header_octets:udl]
        if len(ud) > udl:
            notes.append("octets past the user-data length ignored")
    if any(iei in (IEI_NATIONAL_SINGLE_SHIFT, IEI_NATIONAL_LOCKING_SHIFT) for iei, _ in udh):
        notes.append("national language shift table not supported; default alphabet used")
    return SmsDeliver(
        smsc=smsc,
        sender=sender,
        pid=pid,
        coding=coding,
        scts=scts,
        units=bytes(units),
        udh=udh,
        more_messages=not (first & 0x04),
        reply_path=bool(first & 0x80),
        status_report_indication=bool(first & 0x20),
        pdu=raw.hex().upper(),
        notes=tuple(notes),
    )


def is_hex_pdu(text: str) -> bool:
    """Whether a line can be a PDU: a non-empty, even run of hex digits (as +CMGR/+CMGL print it)."""
    return bool(text) and len(text) % 2 == 0 and all(c in "0123456789ABCDEFabcdef" for c in text)


def tpdu_length(pdu: str) -> int:
    """Octets of the TPDU without the SMSC prefix: the ``<length>`` of ``+CMGR`` / ``+CMT``."""
    raw = bytes.fromhex(pdu)
    return len(raw) - 1 - raw[0]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise PduError(f"PDU ends before the {what} (octet {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def _split(units: bytes, size: int, step: int, unbreakable: frozenset[int], scan: int) -> list[bytes]:
    """Split ``units`` into chunks of at most ``size`` without cutting after a unit in
    ``unbreakable`` (an escape, a high surrogate); ``step`` is the unit width in bytes."""
    chunks = []
    i = 0
    while i < len(units):
        end = min(i + size, len(units))
        if end < len(units):
            last = units[end - step : end]
            if int.from_bytes(last, "big") >> scan in unbreakable:
                end -= step
        chunks.append(units[i:end])
        i = end
    return chunks


def encode_deliver(
    sender: str,
    text: str,
    *,
    smsc: str | None = None,
    scts: datetime | None = None,
    encoding: str = "auto",
    flash: bool = False,
    pid: int = 0,
    ref: int = 0,
    ref_bits: int = 8,
) -> list[str]:
    """SMS-DELIVER PDUs (hex, with the SMSC prefix) carrying ``text`` from ``sender``.

    GSM 7-bit when every character fits (``encoding="auto"``), else UCS2; a text longer than
    one SMS is split into concatenated parts (``ref_bits`` 8 or 16) without splitting an
    escape sequence or a surrogate pair.
    """
    if encoding == "auto":
        encoding = "gsm7" if is_gsm7(text) else "ucs2"
    when = scts or datetime.now(UTC).replace(microsecond=0)
    header_octets = 6 if ref_bits == 8 else 7
    if encoding == "gsm7":
        try:
            units = gsm7_encode(text)
        except UnicodeEncodeError as exc:
            raise PduError(f"text has characters outside GSM 7-bit: {exc}") from None
        per_part = (MAX_UD_OCTETS * 8 - header_octets * 8) // 7
        chunks = (
            [units] if len(units) <= GSM7_SINGLE_SEPTETS else _split(units, per_part, 1, frozenset({ESC}), 0)
        )
        dcs = 0x10 if flash else 0x00
    elif encoding == "ucs2":
        units = text.encode("utf-16-be")
        per_part = MAX_UD_OCTETS - header_octets
        chunks = (
            [units]
            if len(units) <= UCS2_SINGLE_OCTETS
            else _split(units, per_part, 2, frozenset(range(0xD8, 0xDC)), 8)
        )
        dcs = 0x18 if flash else 0x08
    else:
        raise PduError(f"unknown encoding {encoding!r}: use auto, gsm7 or ucs2")
    if len(chunks) > 255:
        raise PduError("text needs more than 255 parts")
    prefix = encode_smsc(smsc)
    oa = encode_address(Address.parse(sender))
    pdus = []
    for seq, chunk in enumerate(chunks, start=1):
        udh = b""
        if len(chunks) > 1:
            udh = build_udh([concat_element(ref, len(chunks), seq, ref_bits)])
        first = 0x04 | (0x40 if udh else 0)  # TP-MMS set: no more messages waiting
        if encoding == "gsm7":
            fill = (7 - (len(udh) * 8) % 7) % 7
            body = udh + pack_septets(chunk, fill)
            udl = math.ceil(len(udh) * 8 / 7) + len(chunk)
        else:
            body = udh + chunk
            udl = len(body)
        tpdu = bytes((first,)) + oa + bytes((pid, dcs)) + encode_scts(when) + bytes((udl,)) + body
        pdus.append((prefix + tpdu).hex().upper())
    return pdus
