"""A received SMS as the modem port yields it, and the reassembly of concatenated parts.

Parts are decoded one by one with the project's TPDU codec (``hardware.sms_pdu``); a long message
is joined from its parts' user data before decoding, so an escape or a surrogate pair split
across two parts still decodes right. A part missing past the timeout gives a partial message,
flagged, never a silent drop; a PDU that does not decode is yielded with its error and raw hex.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hardware.sms_pdu import Alphabet, PduError, SmsDeliver, decode_deliver, decode_units


class Origin(enum.StrEnum):
    """How the message reached the agent."""

    CMTI = "cmti"  # stored on the SIM, indicated by +CMTI, read at once
    CMT = "cmt"  # routed directly to the agent by +CMT, never stored
    STARTUP = "startup"  # found in storage when the port opened (arrived while the agent was down)
    SWEEP = "sweep"  # found in storage later (its indication was lost, or storage was full)


@dataclass(frozen=True)
class Part:
    """One SMS-DELIVER as read from the modem, with when and where it was read."""

    pdu: str
    received_ns: int
    origin: Origin
    memory: str | None = None
    index: int | None = None
    sms: SmsDeliver | None = None
    error: str | None = None

    @classmethod
    def read(
        cls, pdu: str, received_ns: int, origin: Origin, memory: str | None = None, index: int | None = None
    ) -> Part:
        """Decode ``pdu``; a broken one keeps its error instead of raising."""
        try:
            return cls(pdu.upper(), received_ns, origin, memory, index, sms=decode_deliver(pdu))
        except PduError as exc:
            return cls(pdu.upper(), received_ns, origin, memory, index, error=str(exc))


def _utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


@dataclass(frozen=True)
class ReceivedSms:
    """A complete (or flagged partial) received message with everything the PDUs said."""

    #: Sender as received: digits with ``+`` when international, or the alphanumeric name.
    sender: str | None
    #: Type of number of the sender (``international``, ``national``, ``alphanumeric``...).
    sender_type: str | None
    #: The type-of-address octet as received.
    sender_toa: int | None
    text: str | None
    smsc: str | None
    #: Service-centre timestamp with the zone the SMSC gave (1 s resolution).
    scts: datetime | None
    #: When the URC (or the stored read) of the first and of the last part came off the port, UTC.
    arrived_at: datetime
    completed_at: datetime
    parts: int
    total_parts: int
    partial: bool
    missing_parts: tuple[int, ...]
    duplicate_parts: int
    dcs: int | None
    alphabet: str | None
    message_class: int | None
    flash: bool
    pid: int | None
    #: PID 0x40: a type-0 ("silent") SMS that a handset would discard without showing.
    silent: bool
    #: 1..7 for a replace-short-message PID (0x41..0x47), else None.
    replace_type: int | None
    concat_ref: int | None
    concat_ref_bits: int | None
    origin: Origin
    #: ``(memory, index)`` of every part that came from storage.
    storage: tuple[tuple[str, int], ...]
    #: Raw PDU (hex, with SMSC prefix) of every part, in part order.
    pdus: tuple[str, ...]
    decode_error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def stored_before_start(self) -> bool:
        """True when it arrived while the agent was not running."""
        return self.origin is Origin.STARTUP

    @classmethod
    def from_parts(cls, parts: list[Part], total: int, duplicates: int = 0) -> ReceivedSms:
        """Join decoded parts (any order) into one message; ``total`` is the announced count."""
        good = sorted((p for p in parts if p.sms is not None), key=_seq)
        broken = [p for p in parts if p.sms is None]
        first = good[0].sms if good else None
        stamps = [p.received_ns for p in parts]
        seqs = {_seq(p) for p in good}
        missing = tuple(s for s in range(1, total + 1) if s not in seqs) if first and first.concat else ()
        text = None
        notes: list[str] = []
        if good:
            alphabets = {p.sms.coding.alphabet for p in good if p.sms}
            if len(alphabets) == 1:
                text = decode_units(next(iter(alphabets)), b"".join(p.sms.units for p in good if p.sms))
            else:
                text = "".join(p.sms.text for p in good if p.sms)
                notes.append("parts use different alphabets")
            for p in good:
                assert p.sms is not None
                notes.extend(n for n in p.sms.notes if n not in notes)
        concat = first.concat if first else None
        return cls(
            sender=first.sender.value if first else None,
            sender_type=first.sender.type_name if first else None,
            sender_toa=first.sender.toa if first else None,
            text=text,
            smsc=first.smsc.value if first and first.smsc else None,
            scts=first.scts if first else None,
            arrived_at=_utc(min(stamps)),
            completed_at=_utc(max(stamps)),
            parts=len(parts),
            total_parts=total,
            partial=bool(missing) or bool(broken and good),
            missing_parts=missing,
            duplicate_parts=duplicates,
            dcs=first.coding.dcs if first else None,
            alphabet=str(first.coding.alphabet) if first else None,
            message_class=first.coding.message_class if first else None,
            flash=first.is_flash if first else False,
            pid=first.pid if first else None,
            silent=first.is_silent if first else False,
            replace_type=first.replace_type if first else None,
            concat_ref=concat.ref if concat else None,
            concat_ref_bits=concat.ref_bits if concat else None,
            origin=parts[0].origin,
            storage=tuple((p.memory, p.index) for p in parts if p.memory and p.index is not None),
            pdus=tuple(p.pdu for p in good + broken),
            decode_error="; ".join(p.error for p in broken if p.error) or None,
            notes=tuple(notes),
        )


def _seq(part: Part) -> int:
    concat = part.sms.concat if part.sms else None
    return concat.seq if concat else 1


_Key = tuple[str, int, int, int, int]


@dataclass
class _Pending:
    first: float  # monotonic: a wall-clock step (NTP on a Pi without RTC) must not expire parts
    parts: dict[int, Part] = field(default_factory=dict)
    duplicates: int = 0


class Reassembler:
    """Collects concatenated parts until complete, or until ``timeout_s`` after the first."""

    def __init__(self, timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._pending: dict[_Key, _Pending] = {}

    def add(self, part: Part) -> ReceivedSms | None:
        """Take one part; the whole message when this part completes it."""
        concat = part.sms.concat if part.sms else None
        if part.sms is None or concat is None or concat.total == 1:
            return ReceivedSms.from_parts([part], total=1)
        key = (part.sms.sender.value, part.sms.sender.toa, concat.ref_bits, concat.ref, concat.total)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(self._clock())
        if concat.seq in pending.parts:
            if pending.parts[concat.seq].pdu == part.pdu:
                pending.duplicates += 1
                return None
            # Same slot, different content: a reference reused by a new message. Finish the old.
            self._pending[key] = _Pending(self._clock(), parts={concat.seq: part})
            return self._finish(pending, concat.total)
        pending.parts[concat.seq] = part
        if len(pending.parts) == concat.total:
            del self._pending[key]
            return self._finish(pending, concat.total)
        return None

    def expire(self) -> list[ReceivedSms]:
        """Partial messages whose first part came longer than the timeout ago."""
        limit = self._clock() - self.timeout_s
        done = [k for k, p in self._pending.items() if p.first <= limit]
        return [self._finish(self._pending.pop(k), k[4]) for k in done]

    def flush(self) -> list[ReceivedSms]:
        """Everything still waiting, as partial messages (on shutdown: nothing is dropped)."""
        out = [self._finish(p, k[4]) for k, p in self._pending.items()]
        self._pending.clear()
        return out

    def next_deadline(self) -> float | None:
        """When (on the monotonic clock) the oldest pending message times out."""
        if not self._pending:
            return None
        return min(p.first for p in self._pending.values()) + self.timeout_s

    @staticmethod
    def _finish(pending: _Pending, total: int) -> ReceivedSms:
        return ReceivedSms.from_parts(list(pending.parts.values()), total, pending.duplicates)

    def __len__(self) -> int:
        return len(self._pending)


__all__ = ["Alphabet", "Origin", "Part", "Reassembler", "ReceivedSms"]
