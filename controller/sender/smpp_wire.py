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
    return pdu


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
    "encode",
    "generic_nack",
    "make",
    "read_pdu",
    "write_pdu",
]
