"""The SMPP 3.4 route connector: our own small asyncio ESME session on ``smpplib``'s PDU codec.

The libraries' session layers fall short for a sender that measures routes (see
``notes/smpp.md``), so this module owns the session and nothing else: ``smpp_wire`` frames and
codes the PDUs, ``parts`` splits the text. What it adds:

* a window: at most ``window`` submit_sm unanswered, later ones wait in a FIFO queue;
* a response timer on every request; an unanswered one means the bind is lost;
* ``ESME_RTHROTTLED`` / ``ESME_RMSGQFUL``: a pause of all sending (doubling, reset by the next
  success) and a resend of that very segment, up to ``max_retries``;
* a lost bind (closed, enquire_link or submit unanswered, unbind from the SMSC): reconnect with
  back-off and jitter and resend what was written but not answered (SMPP allows the duplicates;
  ``resent`` counts them), queued segments simply wait for the bind;
* a refused bind is logged with its status and retried with back-off, never a tight loop;
* deliver_sm answered at once, then handed to ``on_receipt`` or ``on_mo`` in a task of its own
  so a slow callback never stalls the session.

Source address TON/NPI, unless set in the settings, follow the sender: ``+`` and digits is an
international number (1/1, sent without the ``+``), up to 8 digits a short code (3/0, network
specific, as most SMSCs expect short codes), more digits a number given without its ``+``
(1/1), anything else alphanumeric (5/0, at most 11 characters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import smpplib.consts
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from controller.sender import smpp_wire
from controller.sender.parts import Encoded, encode_text
from controller.sender.rate import RateMeter
from controller.sender.smpp_wire import Pdu, PduError, Sequencer
from controller.submit import SubmitError
from probe_agent.logs import BoundLogger, bind

log = logging.getLogger(__name__)

#: Statuses that mean "not now": pause, then resend the same segment.
THROTTLING_STATUSES = frozenset({smpplib.consts.SMPP_ESME_RTHROTTLED, smpplib.consts.SMPP_ESME_RMSGQFUL})
#: Error statuses after which the same submit may succeed later (the SMSC's trouble, not the
#: message's); every other error is permanent (bad address, bad data coding, ...).
RETRYABLE_STATUSES = frozenset(
    {
        smpplib.consts.SMPP_ESME_RSYSERR,
        smpplib.consts.SMPP_ESME_RINVBNDSTS,
        smpplib.consts.SMPP_ESME_RX_T_APPN,
    }
)
#: deliver_sm esm_class message types that are receipts (SMSC receipt, SME acknowledgement).
RECEIPT_MESSAGE_TYPES = frozenset({0x04, 0x08})
#: Alphanumeric senders have at most 11 characters (GSM 03.40 address field); short codes 8 digits.
MAX_ALPHANUMERIC = 11
MAX_SHORT_CODE_DIGITS = 8
#: source_addr and destination_addr are C-Octet Strings of at most 21 octets, the NUL included.
MAX_ADDRESS = 20

_STATUS_NAMES: dict[int, str] = {
    value: name.removeprefix("SMPP_")
    for name, value in vars(smpplib.consts).items()
    if name.startswith("SMPP_ESME_") and isinstance(value, int)
}


def status_name(status: int) -> str:
    """An SMPP command_status as ``ESME_RTHROTTLED (0x00000058)``."""
    return f"{_STATUS_NAMES.get(status, 'unknown status')} (0x{status:08x})"


class SmppSettings(BaseModel):
    """How to reach and use one SMPP route."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="SMSC host name or address.")
    port: int = Field(ge=1, le=65535, description="SMSC TCP port.")
    system_id: str = Field(
        max_length=15, description="ESME system_id (a 16-octet C-Octet String: 15 characters + NUL)."
    )
    password: SecretStr = Field(
        max_length=8, description="Bind password (a 9-octet C-Octet String: 8 characters + NUL)."
    )
    system_type: str = Field(default="", max_length=12, description="system_type sent in the bind.")
    bind: Literal["transceiver", "transmitter"] = Field(
        default="transceiver",
        description="Bind mode; a transmitter bind receives no receipts on this connection.",
    )
    window: int = Field(default=64, ge=1, le=1024, description="Most submit_sm unanswered at once.")
    enquire_link_s: float = Field(
        default=30.0, gt=0, description="Send enquire_link after this long without a PDU from the SMSC."
    )
    response_timeout_s: float = Field(
        default=10.0, gt=0, description="An unanswered request after this long means the bind is lost."
    )
    bind_timeout_s: float = Field(default=10.0, gt=0, description="Time to connect and get the bind answer.")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First pause before reconnecting.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Longest pause before reconnecting.")
    throttle_backoff_s: float = Field(
        default=1.0, gt=0, description="First sending pause after ESME_RTHROTTLED / ESME_RMSGQFUL; doubles."
    )
    throttle_backoff_max_s: float = Field(default=30.0, gt=0, description="Longest throttling pause.")
    max_retries: int = Field(
        default=5,
        ge=0,
        description="Resends of one segment (throttled, or in flight when the bind was lost) before "
        "the submit fails as retryable.",
    )
    registered_delivery: bool = Field(default=True, description="Ask the SMSC for delivery receipts.")
    source_ton: int | None = Field(
        default=None, ge=0, le=255, description="source_addr_ton; None derives it from the sender."
    )
    source_npi: int | None = Field(
        default=None, ge=0, le=255, description="source_addr_npi; None derives it from the sender."
    )
    dest_ton: int = Field(default=1, ge=0, le=255, description="dest_addr_ton (1: international).")
    dest_npi: int = Field(default=1, ge=0, le=255, description="dest_addr_npi (1: ISDN / E.164).")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> SmppSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is shorter than reconnect_min_s")
        if self.throttle_backoff_max_s < self.throttle_backoff_s:
            raise ValueError("throttle_backoff_max_s is shorter than throttle_backoff_s")
        return self


@dataclass(frozen=True)
class SmppSubmitted:
    """A message every part of which the SMSC accepted."""

    #: The SMSC's message id of each part, in part order.
    message_ids: tuple[str, ...]
    #: When the first part was first written to the socket (UTC).
    submitted_at: datetime
    #: When the last part's submit_sm_resp arrived (UTC).
    acked_at: datetime
    parts: int
    encoding: str


@dataclass
class ConnectorHealth:
    """A snapshot of one connector's state and counters since it was created."""

    route: str
    kind: Literal["smpp"]
    bound: bool
    #: Successful binds, and attempts that did not end bound (connect failed, refused, timed out).
    binds: int
    bind_failures: int
    last_bind_at: datetime | None
    #: Segments written and unanswered, and segments waiting for the window or the bind.
    in_flight: int
    queued: int
    #: submit_sm written (resends included), and accepted.
    submitted: int
    acknowledged: int
    #: Segments refused with a non-throttling error, throttling answers, in-flight resends.
    errors: int
    throttled: int
    resent: int
    receipts: int
    #: submit_sm written per second over the last ~10 s.
    submit_per_s: float
    last_error: str | None


def source_address(sender: str, settings: SmppSettings) -> tuple[int, int, str]:
    """(TON, NPI, source_addr) for ``sender`` (see the module docstring); SubmitError when the
    SMSC could not take it."""
    digits = sender[1:] if sender.startswith("+") else sender
    if sender.startswith("+") and digits.isdigit():
        ton, npi, address = 1, 1, digits
    elif sender.isdigit():
        ton, npi, address = (3, 0, sender) if len(sender) <= MAX_SHORT_CODE_DIGITS else (1, 1, sender)
    else:
        if not sender or len(sender) > MAX_ALPHANUMERIC or not sender.isascii() or not sender.isprintable():
            raise SubmitError(
                f"sender {sender!r}: an alphanumeric sender has 1..{MAX_ALPHANUMERIC} printable ASCII "
                "characters"
            )
        ton, npi, address = 5, 0, sender
    if len(address) > MAX_ADDRESS:
        raise SubmitError(f"sender {sender!r} is longer than {MAX_ADDRESS} characters")
    return (
        settings.source_ton if settings.source_ton is not None else ton,
        settings.source_npi if settings.source_npi is not None else npi,
        address,
    )


def destination_address(destination: str) -> str:
    """destination_addr for an E.164 number: its digits, without the ``+``."""
    address = destination.removeprefix("+")
    if not address.isdigit() or len(address) > MAX_ADDRESS:
        raise SubmitError(f"destination {destination!r} is not a number of 1..{MAX_ADDRESS} digits")
    return address


class _LinkLost(Exception):
    """The session ended; the reason is the message."""


class _BindRefused(_LinkLost):
    """The SMSC answered the bind with an error, or unreadably."""


@dataclass(eq=False)
class _Message:
    """One submit() call: its parts, their ids as they come back, and the caller's future."""

    source: tuple[int, int, str]
    destination: str
    encoded: Encoded
    future: asyncio.Future[SmppSubmitted]
    message_ids: list[str | None]
    submitted_at: datetime | None = None


@dataclass(eq=False)
class _Segment:
    """One part of a message on its way: how often it was resent, when its answer is due."""

    message: _Message
    index: int
    attempts: int = 0
    resend: bool = False
    deadline: float = 0.0


@dataclass
class _Counters:
    binds: int = 0
    bind_failures: int = 0
    submitted: int = 0
    acknowledged: int = 0
    errors: int = 0
    throttled: int = 0
    resent: int = 0
    receipts: int = 0


class SmppConnector:
    """One SMPP route: a session kept bound in the background, and ``submit`` through it."""

    def __init__(
        self,
        name: str,
        settings: SmppSettings,
        *,
        on_receipt: Callable[[Pdu], Awaitable[None]] | None = None,
        on_mo: Callable[[Pdu], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._on_receipt = on_receipt
        self._on_mo = on_mo
        self._log: BoundLogger = bind(log, route=name)
        self._sequencer = Sequencer()  # one numbering across reconnects: late answers never collide
        self._queue: deque[_Segment] = deque()
        self._in_flight: dict[int, _Segment] = {}
        self._control: dict[int, asyncio.Future[Pdu]] = {}
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer: asyncio.StreamWriter | None = None
        self._bound = False
        self._running = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self._pause_until = 0.0
        self._throttle_backoff_s = settings.throttle_backoff_s
        self._last_rx = 0.0
        self._rate = RateMeter()
        self._last_bind_at: datetime | None = None
        self._last_session_bound = False
        self._last_error: str | None = None
        self._counters = _Counters()

    # -- the public interface -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task that connects, binds, keeps the bind and reconnects."""
        if self._task is not None:
            return
        self._running = True
        self._stopping = False
        self._rate.restart()
        self._task = asyncio.create_task(self._run(), name=f"smpp-{self.name}")

    async def stop(self) -> None:
        """Stop sending: queued segments fail as retryable, those in flight get up to one response
        timeout to be answered, then unbind and close."""
        if self._task is None:
            return
        self._running = False
        self._stopping = True
        self._wake.set()
        self._fail_queued(SubmitError(f"route {self.name}: connector stopped", retryable=True))
        if self._bound and self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.settings.response_timeout_s)
            with contextlib.suppress(_LinkLost, OSError, TimeoutError):
                await self._request(self._writer, "unbind")
                self._log.info("unbound")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        stopped = SubmitError(f"route {self.name}: connector stopped", retryable=True)
        for segment in self._in_flight.values():
            self._fail(segment.message, stopped)
        self._in_flight.clear()
        self._fail_queued(stopped)
        for task in list(self._callbacks):
            task.cancel()
        await asyncio.gather(*self._callbacks, return_exceptions=True)

    async def submit(self, *, source: str, destination: str, text: str) -> SmppSubmitted:
        """Submit ``text`` from ``source`` to ``destination`` (E.164) as one or more parts; returns
        when every part is acknowledged. SubmitError when refused or when the connector stops.
        It waits for a bind however long the route is down: bound it with ``asyncio.timeout``
        (a cancelled submit sends none of its parts still queued)."""
        if not self._running:
            raise SubmitError(f"route {self.name}: connector is not running", retryable=True)
        source_fields = source_address(source, self.settings)
        destination_addr = destination_address(destination)
        try:
            encoded = encode_text(text, reference=random.randrange(256))
        except ValueError as exc:
            raise SubmitError(f"route {self.name}: {exc}") from exc
        message = _Message(
            source=source_fields,
            destination=destination_addr,
            encoded=encoded,
            future=asyncio.get_running_loop().create_future(),
            message_ids=[None] * encoded.parts,
        )
        self._queue.extend(_Segment(message, index) for index in range(encoded.parts))
        self._wake.set()
        try:
            return await message.future
        finally:
            if not message.future.done():
                message.future.cancel()  # its queued parts are skipped

    def health(self) -> ConnectorHealth:
        """The connector's state and counters now."""
        counters = self._counters
        return ConnectorHealth(
            route=self.name,
            kind="smpp",
            bound=self._bound,
            binds=counters.binds,
            bind_failures=counters.bind_failures,
            last_bind_at=self._last_bind_at,
            in_flight=len(self._in_flight),
            queued=sum(1 for s in self._queue if not s.message.future.done()),
            submitted=counters.submitted,
            acknowledged=counters.acknowledged,
            errors=counters.errors,
            throttled=counters.throttled,
            resent=counters.resent,
            receipts=counters.receipts,
            submit_per_s=self._rate.per_s(),
            last_error=self._last_error,
        )

    # -- the session ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, bind, serve; after a loss or a refusal pause (back-off with jitter) and again."""
        failures = 0
        while not self._stopping:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _BindRefused as exc:
                self._last_error = str(exc)
            except _LinkLost as exc:
                if self._stopping:  # the SMSC closing after our unbind
                    self._log.info("session closed: %s", exc)
                else:
                    self._last_error = str(exc)
                    self._log.warning("bind lost: %s", exc)
            except (OSError, TimeoutError) as exc:
                self._last_error = f"connection to {self.settings.host}:{self.settings.port} failed: {exc!r}"
                self._log.warning("%s", self._last_error)
            except Exception as exc:  # a bug must not end the connector: log it, reconnect
                self._last_error = f"session failed: {exc!r}"
                self._log.exception("session failed")
            finally:
                self._end_session()
            if self._stopping:
                break
            failures = 0 if self._last_session_bound else failures + 1
            if failures:
                self._counters.bind_failures += 1
            delay = min(
                self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2 ** max(failures - 1, 0)
            )
            delay *= random.uniform(0.8, 1.2)
            self._log.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: bind, then read, write, keep alive and time out until it is lost."""
        self._last_session_bound = False
        settings = self.settings
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port), settings.bind_timeout_s
        )
        self._writer = writer
        try:
            await asyncio.wait_for(self._bind(reader, writer), settings.bind_timeout_s)
        except TimeoutError as exc:
            self._log.warning("bind unanswered after %s s", settings.bind_timeout_s)
            raise _BindRefused(f"bind unanswered after {settings.bind_timeout_s} s") from exc
        self._bound = True
        self._last_session_bound = True
        self._last_bind_at = datetime.now(UTC)
        self._counters.binds += 1
        self._last_rx = time.monotonic()
        self._wake.set()
        self._log.info("bound as %s to %s:%d", settings.bind, settings.host, settings.port)
        tasks = [
            asyncio.create_task(self._read_loop(reader, writer)),
            asyncio.create_task(self._write_loop(writer)),
            asyncio.create_task(self._keepalive(writer)),
            asyncio.create_task(self._watch_timeouts()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # raises the reason the session ended
        raise _LinkLost("session ended")

    async def _bind(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send the bind and wait for its answer; _BindRefused with the status when refused."""
        settings = self.settings
        pdu = smpp_wire.make(
            f"bind_{settings.bind}",
            self._sequencer,
            system_id=settings.system_id,
            password=settings.password.get_secret_value(),
            system_type=settings.system_type,
            addr_ton=0,
            addr_npi=0,
            address_range="",
        )
        smpp_wire.write_pdu(writer, pdu)
        await writer.drain()
        while True:
            try:
                answer = await smpp_wire.read_pdu(reader)
            except PduError as exc:
                self._log.warning("bind refused: unreadable answer: %s", exc.reason)
                raise _BindRefused(f"bind refused: unreadable bind answer ({exc.reason})") from exc
            except asyncio.IncompleteReadError as exc:
                raise _BindRefused("bind refused: the SMSC closed the connection") from exc
            if answer.command == f"bind_{settings.bind}_resp" and answer.sequence == pdu.sequence:
                break
            if answer.command == "generic_nack":
                break
            self._log.info("ignored %s before the bind answer", answer.command)
        if answer.status != smpplib.consts.SMPP_ESME_ROK:
            reason = f"bind refused: {status_name(answer.status)}"
            self._log.warning("%s", reason)
            raise _BindRefused(reason)
        if answer.command == "generic_nack":
            raise _BindRefused("bind refused: generic_nack")

    def _end_session(self) -> None:
        """After a session: in-flight segments go back to the front of the queue to be resent
        after the next bind; pending control requests fail."""
        if self._bound:
            self._log.info("session ended with %d in flight", len(self._in_flight))
        self._bound = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for future in self._control.values():
            if not future.done():
                future.set_exception(_LinkLost("bind lost"))
        self._control.clear()
        returning = [s for s in self._in_flight.values() if not s.message.future.done()]
        self._in_flight.clear()
        self._drained.set()
        for segment in reversed(returning):
            segment.attempts += 1
            if segment.attempts > self.settings.max_retries:
                self._fail(
                    segment.message,
                    SubmitError(
                        f"route {self.name}: bind lost {segment.attempts} times with this segment in flight",
                        retryable=True,
                    ),
                )
                continue
            segment.resend = True
            self._queue.appendleft(segment)

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read and dispatch PDUs until the connection ends."""
        while True:
            try:
                pdu = await smpp_wire.read_pdu(reader)
            except PduError as exc:
                if exc.fatal:
                    raise _LinkLost(f"unreadable stream: {exc.reason}") from exc
                self._log.warning("answered generic_nack to an unreadable PDU: %s", exc.reason)
                smpp_wire.write_pdu(writer, smpp_wire.generic_nack(self._sequencer, exc))
                continue
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise _LinkLost("connection closed by the SMSC") from exc
            self._last_rx = time.monotonic()
            self._dispatch(pdu, writer)

    def _dispatch(self, pdu: Pdu, writer: asyncio.StreamWriter) -> None:
        command: str = pdu.command
        if command == "submit_sm_resp" or (command == "generic_nack" and pdu.sequence in self._in_flight):
            self._answered(pdu)
        elif command == "deliver_sm":
            answer = smpp_wire.make("deliver_sm_resp", self._sequencer, sequence=pdu.sequence, message_id="")
            smpp_wire.write_pdu(writer, answer)
            self._deliver(pdu)
        elif command == "enquire_link":
            smpp_wire.write_pdu(
                writer, smpp_wire.make("enquire_link_resp", self._sequencer, sequence=pdu.sequence)
            )
        elif command == "unbind":
            smpp_wire.write_pdu(writer, smpp_wire.make("unbind_resp", self._sequencer, sequence=pdu.sequence))
            raise _LinkLost("unbound by the SMSC")
        elif pdu.is_response():
            future = self._control.pop(pdu.sequence, None)
            if future is not None and not future.done():
                future.set_result(pdu)
            else:
                self._log.debug("ignored %s seq %d", command, pdu.sequence)
        elif command != "alert_notification":  # alert_notification has no answer
            self._log.warning("answered generic_nack to an unexpected %s", command)
            nack = smpp_wire.make(
                "generic_nack",
                self._sequencer,
                sequence=pdu.sequence,
                status=smpplib.consts.SMPP_ESME_RINVCMDID,
            )
            smpp_wire.write_pdu(writer, nack)

    def _answered(self, pdu: Pdu) -> None:
        """A submit_sm_resp (or generic_nack) for a segment in flight."""
        segment = self._in_flight.pop(pdu.sequence, None)
        if not self._in_flight:
            self._drained.set()
        self._wake.set()
        if segment is None:
            self._log.debug("answer to unknown seq %d", pdu.sequence)
            return
        message = segment.message
        status: int = pdu.status
        if pdu.command == "generic_nack" and status == smpplib.consts.SMPP_ESME_ROK:
            status = smpplib.consts.SMPP_ESME_RUNKNOWNERR  # a nack without a reason is still a refusal
        if status == smpplib.consts.SMPP_ESME_ROK:
            self._counters.acknowledged += 1
            self._throttle_backoff_s = self.settings.throttle_backoff_s
            if message.future.done():
                return
            raw = getattr(pdu, "message_id", None) or b""
            message.message_ids[segment.index] = (
                raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
            ).rstrip("\x00")
            if all(mid is not None for mid in message.message_ids):
                assert message.submitted_at is not None
                message.future.set_result(
                    SmppSubmitted(
                        message_ids=tuple(mid or "" for mid in message.message_ids),
                        submitted_at=message.submitted_at,
                        acked_at=datetime.now(UTC),
                        parts=message.encoded.parts,
                        encoding=message.encoded.encoding,
                    )
                )
        elif status in THROTTLING_STATUSES:
            self._throttled(segment, status)
        else:
            self._counters.errors += 1
            reason = f"route {self.name}: submit_sm refused: {status_name(status)}"
            self._last_error = reason
            self._log.warning("%s", reason)
            self._fail(message, SubmitError(reason, retryable=status in RETRYABLE_STATUSES))

    def _throttled(self, segment: _Segment, status: int) -> None:
        """Pause all sending (unless a pause is already running) and queue the segment first."""
        self._counters.throttled += 1
        segment.attempts += 1
        if segment.message.future.done():
            return
        if segment.attempts > self.settings.max_retries:
            reason = f"route {self.name}: {status_name(status)} {segment.attempts} times for one segment"
            self._last_error = reason
            self._fail(segment.message, SubmitError(reason, retryable=True))
            return
        now = time.monotonic()
        if now >= self._pause_until:
            pause_s = self._throttle_backoff_s
            self._pause_until = now + pause_s
            self._throttle_backoff_s = min(pause_s * 2, self.settings.throttle_backoff_max_s)
            self._log.info("%s: pausing submits for %.3f s", status_name(status), pause_s)
        segment.resend = False
        self._queue.appendleft(segment)

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        """Write queued segments while the window has room and no throttling pause runs; what is
        ready at once goes out as one burst, drained once (one flush per burst, not per PDU)."""
        while True:
            segment: _Segment | None = await self._next_segment()
            while segment is not None:
                self._write_segment(writer, segment)
                segment = self._ready_segment()
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise _LinkLost(f"connection lost while writing: {exc!r}") from exc

    def _write_segment(self, writer: asyncio.StreamWriter, segment: _Segment) -> None:
        message = segment.message
        source_ton, source_npi, source_addr = message.source
        pdu = smpp_wire.make(
            "submit_sm",
            self._sequencer,
            service_type="",
            source_addr_ton=source_ton,
            source_addr_npi=source_npi,
            source_addr=source_addr,
            dest_addr_ton=self.settings.dest_ton,
            dest_addr_npi=self.settings.dest_npi,
            destination_addr=message.destination,
            esm_class=message.encoded.esm_class,
            protocol_id=0,
            priority_flag=0,
            registered_delivery=1 if self.settings.registered_delivery else 0,
            data_coding=message.encoded.data_coding,
            short_message=message.encoded.segments[segment.index],
        )
        segment.deadline = time.monotonic() + self.settings.response_timeout_s
        self._in_flight[pdu.sequence] = segment
        self._drained.clear()
        smpp_wire.write_pdu(writer, pdu)
        if message.submitted_at is None:
            message.submitted_at = datetime.now(UTC)
        self._count_submit(segment)

    def _ready_segment(self) -> _Segment | None:
        """The next segment if it may be written now (window room, no pause, not stopping)."""
        while (
            not self._stopping
            and self._queue
            and len(self._in_flight) < self.settings.window
            and time.monotonic() >= self._pause_until
        ):
            segment = self._queue.popleft()
            if not segment.message.future.done():
                return segment
        return None

    async def _next_segment(self) -> _Segment:
        """The next segment to write, once it may be written."""
        while True:
            pause_s = self._pause_until - time.monotonic()
            if pause_s > 0:
                await asyncio.sleep(pause_s)
                continue
            if (segment := self._ready_segment()) is not None:
                return segment
            self._wake.clear()
            await self._wake.wait()

    def _count_submit(self, segment: _Segment) -> None:
        counters = self._counters
        counters.submitted += 1
        if segment.resend:
            counters.resent += 1
            segment.resend = False
        self._rate.count()

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        """enquire_link after ``enquire_link_s`` without a PDU from the SMSC; unanswered: lost."""
        while True:
            idle_s = time.monotonic() - self._last_rx
            if idle_s < self.settings.enquire_link_s:
                await asyncio.sleep(self.settings.enquire_link_s - idle_s)
                continue
            try:
                await self._request(writer, "enquire_link")
            except TimeoutError as exc:
                raise _LinkLost("enquire_link unanswered") from exc
            except ConnectionError as exc:
                raise _LinkLost(f"connection lost while writing: {exc!r}") from exc

    async def _watch_timeouts(self) -> None:
        """The response timer of the oldest submit in flight (the first in the dict, as every
        deadline is its write time plus the same timeout)."""
        timeout_s = self.settings.response_timeout_s
        while True:
            if not self._in_flight:
                await asyncio.sleep(timeout_s / 4)
                continue
            oldest = next(iter(self._in_flight.values()))
            wait_s = oldest.deadline - time.monotonic()
            if wait_s <= 0:
                raise _LinkLost(f"submit_sm unanswered after {timeout_s} s")
            await asyncio.sleep(wait_s)

    async def _request(self, writer: asyncio.StreamWriter, command: str) -> Pdu:
        """Send a body-less request (enquire_link, unbind) and wait for its answer."""
        pdu = smpp_wire.make(command, self._sequencer)
        future: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        self._control[pdu.sequence] = future
        smpp_wire.write_pdu(writer, pdu)
        try:
            await writer.drain()
            return await asyncio.wait_for(future, self.settings.response_timeout_s)
        finally:
            self._control.pop(pdu.sequence, None)

    # -- receipts and MO ------------------------------------------------------------------------

    def _deliver(self, pdu: Pdu) -> None:
        """Hand a deliver_sm to its callback in a task of its own."""
        esm_class = pdu.esm_class or 0
        is_receipt = (esm_class & 0x3C) in RECEIPT_MESSAGE_TYPES or bool(
            getattr(pdu, "receipted_message_id", None)
        )
        if is_receipt:
            self._counters.receipts += 1
        callback = self._on_receipt if is_receipt else self._on_mo
        if callback is None:
            self._log.debug("deliver_sm (%s) without a callback", "receipt" if is_receipt else "MO")
            return
        task = asyncio.create_task(self._run_callback(callback, pdu, "receipt" if is_receipt else "MO"))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _run_callback(self, callback: Callable[[Pdu], Awaitable[None]], pdu: Pdu, kind: str) -> None:
        try:
            await callback(pdu)
        except Exception:
            self._log.exception("%s callback failed", kind)

    # -- failing --------------------------------------------------------------------------------

    def _fail(self, message: _Message, error: SubmitError) -> None:
        if not message.future.done():
            message.future.set_exception(error)

    def _fail_queued(self, error: SubmitError) -> None:
        while self._queue:
            self._fail(self._queue.popleft().message, error)


__all__ = [
    "ConnectorHealth",
    "SmppConnector",
    "SmppSettings",
    "SmppSubmitted",
    "destination_address",
    "source_address",
    "status_name",
]
