"""SMPP 3.4 on an asyncio stream: framing, sequence numbers and the PDU codec of ``smpplib``.

One codec across the project (the sender's connector and simnet's SMSCs): ``smpplib``'s command
classes encode and parse every PDU; this module only frames them on a stream (a 4-byte length,
then the rest), numbers them, and turns what the codec cannot read into ``PduError`` carrying
the sequence number, so the session can answer ``generic_nack`` instead of dropping the link.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, TypeAlias

import smpplib.consts
import smpplib.exceptions
import smpplib.smpp

#: A PDU is at least its 16-byte header.
HEADER_LENGTH = 16
#: Longer PDUs are refused: a submit_sm with a 64 KB message_payload is far beyond any SMSC's.
MAX_PDU_LENGTH = 70_000
#: Sequence numbers run 1 .. 0x7FFFFFFF (SMPP 3.4 section 3.2), then wrap.
MAX_SEQUENCE = 0x7FFFFFFF

#: A ``smpplib.command.Command`` (the library has no type hints).
Pdu: TypeAlias = Any


class PduError(Exception):
    """A PDU that could not be read. ``sequence`` is its sequence number when the header was
    readable (answer it with ``generic_nack``), ``status`` the SMPP error to answer with, and
    ``fatal`` true when the stream itself is out of step (a bad length) and must be closed."""

    def __init__(self, reason: str, *, sequence: int | None, status: int, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sequence = sequence
        self.status = status
        self.fatal = fatal


class Sequencer:
    """Sequence numbers for one session, in the shape ``smpplib``'s PDUs ask their client for."""

    def __init__(self, start: int = 0) -> None:
        self.sequence = start

    def next_sequence(self) -> int:
        """The next sequence number, wrapping after ``MAX_SEQUENCE``."""
        self.sequence = self.sequence % MAX_SEQUENCE + 1
        return self.sequence


def make(command: str, sequencer: Sequencer, **fields: Any) -> Pdu:
    """A PDU of ``command`` (``"submit_sm"``, ``"deliver_sm_resp"``, ...) with ``fields``; it takes
    the next sequence number unless ``sequence=`` is given (as responses do)."""
    sequence = fields.pop("sequence", None)
    pdu: Pdu = smpplib.smpp.make_pdu(command, client=sequencer, sequence=sequence, **fields)
    if sequence is not None:  # the library keeps the client's number over a given one
        pdu.sequence = sequence
    return pdu


def encode(pdu: Pdu) -> bytes:
    """The PDU's bytes on the wire."""
    data: bytes = pdu.generate()
    return data


def decode(data: bytes) -> Pdu:
    """Parse one whole PDU (header included); ``PduError`` when the codec cannot."""
    if len(data) < HEADER_LENGTH:
        raise PduError(f"a PDU of {len(data)} bytes is shorter than its header", sequence=None, status=0x2)
    length, command_id, _status, sequence = struct.unpack(">LLLL", data[:HEADER_LENGTH])
    if length != len(data):
        raise PduError(
            f"command_length {length} but {len(data)} bytes", sequence=sequence, status=0x1, fatal=True
        )
    try:
        pdu: Pdu | None = smpplib.smpp.parse_pdu(data, client=Sequencer(), allow_unknown_opt_params=True)
    except smpplib.exceptions.UnknownCommandError:
        pdu = None
    except Exception as exc:  # the codec raises plain errors (struct, index, unicode) on bad bodies
        raise PduError(
            f"command 0x{command_id:08x}: unreadable body ({type(exc).__name__}: {exc})",
            sequence=sequence,
            status=smpplib.consts.SMPP_ESME_RSYSERR,
        ) from exc
    if pdu is None:
        raise PduError(
            f"unknown command_id 0x{command_id:08x}",
            sequence=sequence,
            status=smpplib.consts.SMPP_ESME_RINVCMDID,
        )
    if command_id == DELIVER_SM and (tlv := deliver_sm_tlvs(data).get(RECEIPTED_MESSAGE_ID)) is not None:
        pdu.receipted_message_id = tlv.rstrip(b"\x00")
    return pdu


#: command_id of deliver_sm; tag of the receipted_message_id TLV (SMPP 3.4 section 5.3.2.12).
DELIVER_SM = 0x00000005
RECEIPTED_MESSAGE_ID = 0x001E
#: deliver_sm's mandatory fields before sm_length, in order, and their sizes in octets (0: a
#: NUL-terminated C-octet string) (SMPP 3.4 section 4.6.1).
_DELIVER_SM_FIELDS = (
    ("service_type", 0),
    ("source_addr_ton", 1),
    ("source_addr_npi", 1),
    ("source_addr", 0),
    ("dest_addr_ton", 1),
    ("dest_addr_npi", 1),
    ("destination_addr", 0),
    ("esm_class", 1),
    ("protocol_id", 1),
    ("priority_flag", 1),
    ("schedule_delivery_time", 0),
    ("validity_period", 0),
    ("registered_delivery", 1),
    ("replace_if_present_flag", 1),
    ("data_coding", 1),
    ("sm_default_msg_id", 1),
)


def deliver_sm_tlvs(data: bytes) -> dict[int, bytes]:
    """The raw optional parameters of a whole deliver_sm PDU, by tag; empty when the body does
    not walk cleanly. smpplib reads a C-octet-string TLV as ``length - 1`` bytes, assuming the
    NUL the spec asks for; SMSCs that leave it out would lose the last character of the id."""
    pos = HEADER_LENGTH
    try:
        for _name, size in _DELIVER_SM_FIELDS:
            pos = data.index(b"\x00", pos) + 1 if size == 0 else pos + size
        pos += 1 + data[pos]  # sm_length, short_message
        tlvs: dict[int, bytes] = {}
        while pos + 4 <= len(data):
            tag, length = struct.unpack_from(">HH", data, pos)
            tlvs[tag] = data[pos + 4 : pos + 4 + length]
            pos += 4 + length
    except (ValueError, IndexError, struct.error):
        return {}
    return tlvs


async def read_pdu(reader: asyncio.StreamReader, *, max_length: int = MAX_PDU_LENGTH) -> Pdu:
    """The next PDU from ``reader``. ``asyncio.IncompleteReadError`` when the peer closed;
    ``PduError`` when the PDU is unreadable (``fatal`` when its length is impossible: the stream
    cannot be resynchronised)."""
    header = await reader.readexactly(4)
    (length,) = struct.unpack(">L", header)
    if not HEADER_LENGTH <= length <= max_length:
        raise PduError(
            f"command_length {length} outside {HEADER_LENGTH}..{max_length}",
            sequence=None,
            status=smpplib.consts.SMPP_ESME_RINVCMDLEN,
            fatal=True,
        )
    body = await reader.readexactly(length - 4)
    return decode(header + body)


def write_pdu(writer: asyncio.StreamWriter, pdu: Pdu) -> None:
    """Queue ``pdu`` on ``writer`` (the caller drains when it wants back-pressure)."""
    writer.write(encode(pdu))


def generic_nack(sequencer: Sequencer, error: PduError) -> Pdu:
    """The ``generic_nack`` answering an unreadable PDU."""
    return make("generic_nack", sequencer, sequence=error.sequence or 0, status=error.status)


__all__ = [
    "MAX_PDU_LENGTH",
    "Pdu",
    "PduError",
    "Sequencer",
    "decode",
    "deliver_sm_tlvs",
    "encode",
    "generic_nack",
    "make",
    "read_pdu",
    "write_pdu",
]
