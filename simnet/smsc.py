"""An SMPP 3.4 SMSC (server) on loopback, for the sender's tests and simnet's upstream routes.

It binds ESMEs, accepts ``submit_sm``, issues hex message ids and sends delivery receipts as
``deliver_sm``, misbehaving on demand the way real SMSCs do (throttling, full queues, system
errors, a rate limit, dropped connections, refused binds, slow responses, receipts in several
formats, unacknowledged receipts resent on the next bind). ``SmscBehaviour`` is read on every
PDU, so a test may change it mid-run; simnet layers its quality profiles on top through the
``check_submit`` hook (refuse a submit with an error status of its choosing), the ``on_submit``
hook and ``send_receipt``. The PDU codec is ``smpplib``'s, through
``controller.sender.smpp_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)
import smpplib.consts as c

from controller.sender import smpp_wire
from controller.sender.smpp_wire import Pdu, PduError, Sequencer

log = logging.getLogger(__name__)

#: esm_class bits: UDH indicator, and "this deliver_sm is an SMSC delivery receipt".
ESM_UDHI = 0x40
ESM_DELIVERY_RECEIPT = 0x04
#: data_coding values the server decodes.
DC_GSM7 = 0x00
DC_ASCII = 0x01
DC_LATIN1 = 0x03
DC_UCS2 = 0x08
#: The longest short_message; longer MO texts go in message_payload.
MAX_SHORT_MESSAGE = 254
#: How long stop() waits for each session's unbind_resp before closing it anyway.
UNBIND_WAIT_S = 0.5
#: How long stop() then waits for the connections' read loops to end before cancelling them.
STOP_WAIT_S = 2.0
#: message_state (TLV 0x0427) for each receipt stat (SMPP 3.4 section 5.2.28).
MESSAGE_STATES: dict[str, int] = {
    "ENROUTE": 1,
    "DELIVRD": 2,
    "EXPIRED": 3,
    "DELETED": 4,
    "UNDELIV": 5,
    "ACCEPTD": 6,
    "UNKNOWN": 7,
    "REJECTD": 8,
}

BindKind = Literal["transmitter", "receiver", "transceiver"]
_BINDS: dict[str, BindKind] = {
    "bind_transmitter": "transmitter",
    "bind_receiver": "receiver",
    "bind_transceiver": "transceiver",
}


@dataclass(frozen=True)
class ReceiptFormat:
    """How this SMSC writes delivery receipts, since real SMSCs differ."""

    #: 10: ``YYMMDDhhmm`` (SMPP 3.4 Appendix B); 12: ``YYMMDDhhmmss``.
    date_digits: Literal[10, 12] = 10
    #: The ``id:`` field: the issued (hex) id as is, or its decimal value, or in upper-case hex.
    id_in_text: Literal["decimal", "hex", "same"] = "same"
    #: Add the ``receipted_message_id`` (0x001E) and ``message_state`` (0x0427) TLVs.
    tlvs: bool = True
    #: ``err:`` as three decimal digits or as three hex digits.
    err_style: Literal["decimal", "hex"] = "decimal"


@dataclass
class SmscBehaviour:
    """What the SMSC does; read on every PDU, so it may be changed while sessions run.

    The ``*_every`` counters restart whenever their value changes.
    """

    throttle_every: int | None = None
    queue_full_every: int | None = None
    error_every: int | None = None
    max_submits_per_s: float | None = None
    drop_after_submits: int | None = None
    refuse_bind: bool = False
    response_delay_ms: float = 0.0
    receipts: bool = True
    receipt_delay_ms: float = 0.0
    receipt_status: str = "DELIVRD"
    receipt_format: ReceiptFormat = field(default_factory=ReceiptFormat)
    #: A receipt not acknowledged (deliver_sm_resp OK) within this is resent on the next bind.
    receipt_ack_timeout_ms: float = 10_000.0


@dataclass(frozen=True)
class ReceivedSubmit:
    """One accepted ``submit_sm``, decoded."""

    message_id: str
    received_at: datetime
    system_id: str
    source_addr: str
    source_addr_ton: int
    source_addr_npi: int
    destination_addr: str
    data_coding: int
    esm_class: int
    registered_delivery: int
    short_message: bytes
    message_payload: bytes | None
    udh: bytes | None
    text: str
    concat: tuple[int, int, int] | None


SubmitHook = Callable[[ReceivedSubmit], Awaitable[None] | None]
#: Asked about each submit that passed the behaviour's rules, before it is accepted: None (or 0)
#: accepts it, any other value is the command_status it is refused with. The submit it gets has
#: no message id yet (``""``). Runs in the session's read loop, so it must be quick.
SubmitCheck = Callable[[ReceivedSubmit], int | None]


# --------------------------------------------------------------------------- decoding helpers


def _text_field(value: Any) -> str:
    """A C-octet-string field as smpplib parsed it (bytes, or None when absent)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.rstrip(b"\x00").decode("latin-1")
    return str(value)


def _int_field(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


def split_udh(payload: bytes) -> tuple[bytes | None, bytes, tuple[int, int, int] | None]:
    """``(udh, body, concat)`` of a payload that starts with a UDH (esm_class UDHI).

    The UDH is its length octet and the information elements; ``concat`` is (reference, total,
    sequence) from IEI 0x00 (8-bit reference) or 0x08 (16-bit reference). A UDH longer than the
    payload is not a UDH: ``(None, payload, None)``.
    """
    if not payload or payload[0] + 1 > len(payload):
        return None, payload, None
    end = payload[0] + 1
    udh, body = payload[:end], payload[end:]
    concat = None
    pos = 1
    while pos + 2 <= end:
        iei, length = udh[pos], udh[pos + 1]
        value = udh[pos + 2 : pos + 2 + length]
        if len(value) < length:
            break
        if iei == 0x00 and length == 3:
            concat = (value[0], value[1], value[2])
        elif iei == 0x08 and length == 4:
            concat = ((value[0] << 8) | value[1], value[2], value[3])
        pos += 2 + length
    return udh, body, concat


def decode_text(body: bytes, data_coding: int) -> str:
    """The text of a message body: GSM 03.38 unpacked septets (0), IA5 (1), Latin-1 (3), UCS2 as
    UTF-16-BE (8, surrogate pairs kept, a split pair kept as a lone surrogate); Latin-1 otherwise.
    """
    if data_coding == DC_GSM7 or data_coding & 0xF4 == 0xF0:
        return body.decode("gsm03.38", errors="replace")
    if data_coding == DC_UCS2:
        return body[: len(body) // 2 * 2].decode("utf-16-be", errors="surrogatepass")
    if data_coding == DC_ASCII:
        return body.decode("ascii", errors="replace")
    return body.decode("latin-1")


def encode_text(text: str) -> tuple[bytes, int]:
    """``(bytes, data_coding)`` for an MO text: GSM 03.38 when it can, else UCS2."""
    try:
        return text.encode("gsm03.38"), DC_GSM7
    except UnicodeError:
        return text.encode("utf-16-be", errors="surrogatepass"), DC_UCS2


# --------------------------------------------------------------------------- receipts


@dataclass
class _Receipt:
    """A receipt to deliver, kept until the ESME acknowledges it."""

    message_id: str
    system_id: str
    source_addr: str  # the receipt's source: the original destination
    destination_addr: str  # the original source
    submit_date: datetime
    original_text: str
    stat: str
    err: str
    fmt: ReceiptFormat
    done_date: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: Sent and its acknowledgement still awaited within the timeout: not to be resent yet.
    in_flight: bool = False


def _receipt_date(moment: datetime, digits: int) -> str:
    return moment.astimezone(UTC).strftime("%y%m%d%H%M%S" if digits == 12 else "%y%m%d%H%M")


def receipt_text(
    receipt_id: str,
    *,
    stat: str,
    err: str,
    submit_date: datetime,
    done_date: datetime,
    original_text: str,
    fmt: ReceiptFormat,
) -> str:
    """The SMPP 3.4 Appendix B receipt text for ``receipt_id`` in format ``fmt``."""
    text_id = receipt_id
    if fmt.id_in_text == "decimal":
        with contextlib.suppress(ValueError):
            text_id = str(int(receipt_id, 16))
    elif fmt.id_in_text == "hex":
        text_id = receipt_id.upper()
    err_text = err
    if err.isdigit():
        err_text = f"{int(err):03X}" if fmt.err_style == "hex" else f"{int(err):03d}"
    delivered = "001" if stat == "DELIVRD" else "000"
    return (
        f"id:{text_id} sub:001 dlvrd:{delivered} submit date:{_receipt_date(submit_date, fmt.date_digits)}"
        f" done date:{_receipt_date(done_date, fmt.date_digits)} stat:{stat} err:{err_text}"
        f" text:{original_text[:20]}"
    )


class _EveryN:
    """Counts events for an "every Nth" rule; the count restarts when N changes."""

    def __init__(self) -> None:
        self.n: int | None = None
        self.count = 0

    def hit(self, n: int | None) -> bool:
        if n != self.n:
            self.n, self.count = n, 0
        if n is None or n <= 0:
            return False
        self.count += 1
        if self.count >= n:
            self.count = 0
            return True
        return False


class _RateLimit:
    """A token bucket: ``rate`` per second, bursts of ``max(1, rate)``."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.tokens = 0.0
        self.at = 0.0

    def allow(self, rate: float | None) -> bool:
        now = time.monotonic()
        if rate is None or rate <= 0:
            self.rate = None
            return True
        capacity = max(1.0, rate)
        if rate != self.rate:
            self.rate, self.tokens, self.at = rate, capacity, now
        self.tokens = min(capacity, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- session


class _Session:
    """One ESME connection: its read loop, bind state and outstanding deliver_sm."""

    def __init__(
        self, server: SmscServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.sequencer = Sequencer()
        self.system_id = ""
        self.bound: BindKind | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.closed = False
        self.finished = False
        #: deliver_sm sequence -> the receipt it carries (None for an MO message).
        self.outstanding: dict[int, tuple[_Receipt | None, asyncio.Future[bool]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.unbound = asyncio.Event()
        #: Accepted submits whose response is still to be sent; their receipts wait for it.
        self.unanswered: set[asyncio.Event] = set()

    @property
    def can_receive(self) -> bool:
        return not self.closed and self.bound in ("receiver", "transceiver")

    def _extra(self) -> dict[str, Any]:
        return {"route": self.server.name, "system_id": self.system_id or None}

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, pdu: Pdu) -> bool:
        """Write ``pdu``; False when the connection is gone."""
        if self.closed:
            return False
        try:
            smpp_wire.write_pdu(self.writer, pdu)
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            log.info("%s: write to %s failed: %s", self.server.name, self.peer, exc, extra=self._extra())
            self.abort()
            return False
        return True

    def abort(self) -> None:
        """Close the transport now; the read loop then ends."""
        if not self.closed:
            self.closed = True
            self.writer.close()

    async def run(self) -> None:
        """Read and answer PDUs until the peer leaves, unbinds or the server stops."""
        log.info("%s: connection from %s", self.server.name, self.peer, extra=self._extra())
        try:
            while not self.closed:
                try:
                    pdu = await smpp_wire.read_pdu(self.reader)
                except PduError as exc:
                    log.warning(
                        "%s: unreadable PDU from %s: %s",
                        self.server.name,
                        self.peer,
                        exc.reason,
                        extra=self._extra(),
                    )
                    if exc.fatal:
                        break
                    await self.send(smpp_wire.generic_nack(self.sequencer, exc))
                    continue
                await self.handle(pdu)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a bug here must not kill the server nor reach the loop's handler
            log.exception("%s: session with %s failed", self.server.name, self.peer, extra=self._extra())
        finally:
            self.finish()

    def finish(self) -> None:
        """Tidy up after the read loop: unacknowledged receipts wait for the next bind."""
        if self.finished:
            return
        self.finished = True
        self.abort()
        for receipt, future in self.outstanding.values():
            if not future.done():
                future.set_result(False)
            if receipt is not None:
                receipt.in_flight = False
                self.server.keep_for_rebind(receipt)
        self.outstanding.clear()
        for task in list(self.tasks):
            task.cancel()
        for answered in self.unanswered:  # accepted, never answered: the SMSC still delivers them
            answered.set()
        self.unanswered.clear()
        self.unbound.set()
        self.server.forget(self)
        log.info(
            "%s: %s (%s) disconnected",
            self.server.name,
            self.peer,
            self.system_id or "unbound",
            extra=self._extra(),
        )

    async def handle(self, pdu: Pdu) -> None:
        command: str = pdu.command
        if command in _BINDS:
            await self.on_bind(pdu, _BINDS[command])
        elif command == "submit_sm":
            await self.on_submit(pdu)
        elif command == "enquire_link":
            await self.send(smpp_wire.make("enquire_link_resp", self.sequencer, sequence=pdu.sequence))
        elif command == "unbind":
            await self.send(smpp_wire.make("unbind_resp", self.sequencer, sequence=pdu.sequence))
            log.info("%s: %s unbound", self.server.name, self.system_id, extra=self._extra())
            self.abort()
        elif command == "unbind_resp":
            self.unbound.set()
            self.abort()
        elif command in ("deliver_sm_resp", "generic_nack"):
            self.on_deliver_resp(pdu)
        elif command == "enquire_link_resp":
            pass
        elif pdu.is_response():
            log.debug(
                "%s: ignoring %s from %s", self.server.name, command, self.system_id, extra=self._extra()
            )
        else:  # query_sm, data_sm, ...: not offered by this SMSC
            error = PduError(f"{command} not supported", sequence=pdu.sequence, status=c.SMPP_ESME_RINVCMDID)
            await self.send(smpp_wire.generic_nack(self.sequencer, error))

    async def respond_error(self, command: str, sequence: int, status: int) -> None:
        """An error response without a body, as SMPP 3.4 says for non-zero command_status."""
        pdu = smpp_wire.make(command, self.sequencer, sequence=sequence, status=status)
        pdu.params_order = ()  # the codec then writes the header only
        await self.send(pdu)

    async def on_bind(self, pdu: Pdu, kind: BindKind) -> None:
        server = self.server
        resp = f"{pdu.command}_resp"
        system_id = _text_field(pdu.system_id)
        status = c.SMPP_ESME_ROK
        if self.bound is not None:
            status = c.SMPP_ESME_RALYBND
        elif system_id != server.system_id:
            status = c.SMPP_ESME_RINVSYSID
        elif _text_field(pdu.password) != server.password:
            status = c.SMPP_ESME_RINVPASWD
        elif server.behaviour.refuse_bind:
            status = c.SMPP_ESME_RBINDFAIL
        if status != c.SMPP_ESME_ROK:
            log.info(
                "%s: bind %s as %s from %s refused (0x%02x)",
                server.name,
                system_id,
                kind,
                self.peer,
                status,
                extra={"route": server.name, "system_id": system_id},
            )
            await self.respond_error(resp, pdu.sequence, status)
            return
        self.system_id, self.bound = system_id, kind
        server.binds += 1
        await self.send(
            smpp_wire.make(resp, self.sequencer, sequence=pdu.sequence, system_id=server.name[:15])
        )
        log.info("%s: %s bound as %s from %s", server.name, system_id, kind, self.peer, extra=self._extra())
        if self.can_receive:
            server.resend_pending(self)

    async def on_submit(self, pdu: Pdu) -> None:
        server = self.server
        behaviour = server.behaviour
        if self.bound not in ("transmitter", "transceiver"):
            await self.respond_error("submit_sm_resp", pdu.sequence, c.SMPP_ESME_RINVBNDSTS)
            return
        if server.drop_rule.hit(behaviour.drop_after_submits):
            behaviour.drop_after_submits = None
            server.drop_rule.n = None
            log.info(
                "%s: dropping the connection of %s after a submit, as told",
                server.name,
                self.system_id,
                extra=self._extra(),
            )
            self.abort()
            return
        status = c.SMPP_ESME_ROK
        # Every rule counts every submit, so that changing one does not shift the others.
        hits = (
            (server.throttle_rule.hit(behaviour.throttle_every), c.SMPP_ESME_RTHROTTLED),
            (server.queue_full_rule.hit(behaviour.queue_full_every), c.SMPP_ESME_RMSGQFUL),
            (server.error_rule.hit(behaviour.error_every), c.SMPP_ESME_RSYSERR),
        )
        for hit, error in hits:
            if hit:
                status = error
                break
        if status == c.SMPP_ESME_ROK and not server.rate_limit.allow(behaviour.max_submits_per_s):
            status = c.SMPP_ESME_RTHROTTLED
        candidate: ReceivedSubmit | None = None
        if status == c.SMPP_ESME_ROK and server.check_submit is not None:
            candidate = server.decode(pdu, self.system_id)
            status = server.checked(candidate)
        if status != c.SMPP_ESME_ROK:
            if behaviour.response_delay_ms > 0:
                self.spawn(self.answer_submit(pdu.sequence, status, None, behaviour.response_delay_ms))
            else:
                await self.answer_submit(pdu.sequence, status, None, 0.0)
            return
        submit = server.accept(pdu, self.system_id, candidate)
        answered = asyncio.Event()
        self.unanswered.add(answered)
        if behaviour.response_delay_ms > 0:  # answered in the background: later submits are not held up
            self.spawn(
                self.answer_submit(
                    pdu.sequence, status, submit.message_id, behaviour.response_delay_ms, answered
                )
            )
        else:
            await self.answer_submit(pdu.sequence, status, submit.message_id, 0.0, answered)
        server.after_submit(submit, answered)

    async def answer_submit(
        self,
        sequence: int,
        status: int,
        message_id: str | None,
        delay_ms: float,
        answered: asyncio.Event | None = None,
    ) -> None:
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if message_id is None:
            await self.respond_error("submit_sm_resp", sequence, status)
        else:
            await self.send(
                smpp_wire.make("submit_sm_resp", self.sequencer, sequence=sequence, message_id=message_id)
            )
        if answered is not None:
            answered.set()
            self.unanswered.discard(answered)

    async def deliver_sm(self, receipt: _Receipt | None, **fields: Any) -> asyncio.Future[bool] | None:
        """Send a deliver_sm; the future says whether the ESME acknowledged it (None: not sent)."""
        pdu = smpp_wire.make("deliver_sm", self.sequencer, **fields)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.outstanding[pdu.sequence] = (receipt, future)
        if not await self.send(pdu):
            self.outstanding.pop(pdu.sequence, None)
            return None
        return future

    def on_deliver_resp(self, pdu: Pdu) -> None:
        entry = self.outstanding.pop(pdu.sequence, None)
        if entry is None:
            log.debug(
                "%s: %s for no outstanding deliver_sm (seq %d)",
                self.server.name,
                pdu.command,
                pdu.sequence,
                extra=self._extra(),
            )
            return
        receipt, future = entry
        ok = pdu.command == "deliver_sm_resp" and pdu.status == c.SMPP_ESME_ROK
        if not future.done():
            future.set_result(ok)
        if receipt is not None:
            receipt.in_flight = False
            if ok:
                self.server.acknowledged(receipt)
            else:
                log.info(
                    "%s: receipt %s refused by %s (0x%02x)",
                    self.server.name,
                    receipt.message_id,
                    self.system_id,
                    pdu.status,
                    extra=self._extra(),
                )

    async def close(self) -> None:
        """Unbind (waiting briefly for unbind_resp), then close."""
        if self.bound is not None and not self.closed:
            self.unbound.clear()
            if await self.send(smpp_wire.make("unbind", self.sequencer)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.unbound.wait(), UNBIND_WAIT_S)
        self.abort()


# --------------------------------------------------------------------------- server


class SmscServer:
    """An SMPP 3.4 SMSC listening on ``host:port`` (port 0: any free port, see ``port``)."""

    def __init__(
        self,
        *,
        system_id: str = "probe",
        password: str = "secret",
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: SmscBehaviour | None = None,
        name: str = "smsc",
        on_submit: SubmitHook | None = None,
        check_submit: SubmitCheck | None = None,
    ) -> None:
        self.system_id = system_id
        self.password = password
        self.host = host
        self.port = port
        self.behaviour = behaviour if behaviour is not None else SmscBehaviour()
        self.name = name
        self.on_submit = on_submit
        self.check_submit = check_submit
        self.submits: list[ReceivedSubmit] = []
        self.binds = 0
        self.throttle_rule = _EveryN()
        self.queue_full_rule = _EveryN()
        self.error_rule = _EveryN()
        self.drop_rule = _EveryN()
        self.rate_limit = _RateLimit()
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._hook_queue: asyncio.Queue[ReceivedSubmit] = asyncio.Queue()
        self._by_id: dict[str, ReceivedSubmit] = {}
        #: receipts sent and not yet acknowledged, or not yet sent, by system_id then message id.
        self._unacked: dict[str, dict[str, _Receipt]] = {}
        self._id_prefix = secrets.randbits(16) | 0xA000  # a letter first: the hex id is never all digits
        self._id_counter = 0

    @property
    def sessions(self) -> int:
        """Sessions currently bound."""
        return sum(1 for s in self._sessions if s.bound is not None and not s.closed)

    @property
    def pending_receipts(self) -> int:
        """Receipts sent and not yet acknowledged, or waiting for a bind to be sent on."""
        return sum(len(pending) for pending in self._unacked.values())

    async def start(self) -> None:
        """Listen; ``port`` is the bound port afterwards."""
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._run_hooks())
        log.info("%s: SMSC listening on %s:%d", self.name, self.host, self.port, extra={"route": self.name})

    async def stop(self) -> None:
        """Unbind and close every session, stop listening, end background work."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(s.close() for s in list(self._sessions)), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connections:  # closed transports end their read loops; cancel any that lingers
            _, lingering = await asyncio.wait(list(self._connections), timeout=STOP_WAIT_S)
            for task in lingering:
                task.cancel()
            await asyncio.gather(*lingering, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("%s: SMSC stopped", self.name, extra={"route": self.name})

    async def __aenter__(self) -> SmscServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await session.run()
            await asyncio.gather(*session.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            session.finish()
        finally:
            if task is not None:
                self._connections.discard(task)

    def forget(self, session: _Session) -> None:
        self._sessions.discard(session)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- submits

    def _next_message_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix:04x}{self._id_counter:08x}"

    def decode(self, pdu: Pdu, system_id: str) -> ReceivedSubmit:
        """A submit_sm decoded, received now, with no message id yet."""
        short_message: bytes = pdu.short_message or b""
        message_payload: bytes | None = pdu.message_payload or None
        payload = message_payload if message_payload is not None else short_message
        esm_class = _int_field(pdu.esm_class)
        data_coding = _int_field(pdu.data_coding)
        udh: bytes | None = None
        concat: tuple[int, int, int] | None = None
        body = payload
        if esm_class & ESM_UDHI:
            udh, body, concat = split_udh(payload)
        if concat is None and pdu.sar_total_segments:
            concat = (
                _int_field(pdu.sar_msg_ref_num),
                pdu.sar_total_segments,
                _int_field(pdu.sar_segment_seqnum),
            )
        return ReceivedSubmit(
            message_id="",
            received_at=datetime.now(UTC),
            system_id=system_id,
            source_addr=_text_field(pdu.source_addr),
            source_addr_ton=_int_field(pdu.source_addr_ton),
            source_addr_npi=_int_field(pdu.source_addr_npi),
            destination_addr=_text_field(pdu.destination_addr),
            data_coding=data_coding,
            esm_class=esm_class,
            registered_delivery=_int_field(pdu.registered_delivery),
            short_message=short_message,
            message_payload=message_payload,
            udh=udh,
            text=decode_text(body, data_coding),
            concat=concat,
        )

    def checked(self, submit: ReceivedSubmit) -> int:
        """The status ``check_submit`` gives ``submit`` (ROK when it accepts it, or fails)."""
        if self.check_submit is None:
            return int(c.SMPP_ESME_ROK)
        try:
            return self.check_submit(submit) or int(c.SMPP_ESME_ROK)
        except Exception:
            log.exception(
                "%s: check_submit failed; submit accepted",
                self.name,
                extra={"route": self.name, "system_id": submit.system_id},
            )
            return int(c.SMPP_ESME_ROK)

    def accept(self, pdu: Pdu, system_id: str, decoded: ReceivedSubmit | None = None) -> ReceivedSubmit:
        """Record an accepted submit_sm (decoded already, or now) and give it a message id."""
        submit = replace(
            decoded if decoded is not None else self.decode(pdu, system_id),
            message_id=self._next_message_id(),
        )
        self.submits.append(submit)
        self._by_id[submit.message_id] = submit
        log.debug(
            "%s: accepted %s from %s to %s",
            self.name,
            submit.message_id,
            system_id,
            submit.destination_addr,
            extra={"route": self.name, "system_id": system_id},
        )
        return submit

    def after_submit(self, submit: ReceivedSubmit, answered: asyncio.Event) -> None:
        """Run the hook (in order, off the read loop) and schedule the receipt."""
        if self.on_submit is not None:
            self._hook_queue.put_nowait(submit)
        behaviour = self.behaviour
        stat = behaviour.receipt_status
        wanted = submit.registered_delivery & 0x03
        if behaviour.receipts and (wanted == 1 or (wanted == 2 and stat != "DELIVRD")):
            self._spawn(
                self._receipt_later(
                    submit, answered, behaviour.receipt_delay_ms, stat, behaviour.receipt_format
                )
            )

    async def _run_hooks(self) -> None:
        while True:
            submit = await self._hook_queue.get()
            if self.on_submit is None:
                continue
            try:
                result = self.on_submit(submit)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception(
                    "%s: on_submit failed for %s",
                    self.name,
                    submit.message_id,
                    extra={"route": self.name, "system_id": submit.system_id},
                )

    async def _receipt_later(
        self, submit: ReceivedSubmit, answered: asyncio.Event, delay_ms: float, stat: str, fmt: ReceiptFormat
    ) -> None:
        await answered.wait()  # never a receipt before its submit_sm_resp (or the end of its session)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        await self.send_receipt(submit.message_id, stat=stat, fmt=fmt)

    # -- receipts and MO messages

    async def send_receipt(
        self, message_id: str, *, stat: str = "DELIVRD", err: str = "000", fmt: ReceiptFormat | None = None
    ) -> bool:
        """Send a delivery receipt for ``message_id`` to a bound receiver/transceiver of the system
        that submitted it (any bound one for an id this server never issued). False when none is
        bound: the receipt then waits for the next bind, as a real SMSC's would."""
        submit = self._by_id.get(message_id)
        receipt = _Receipt(
            message_id=message_id,
            system_id=submit.system_id if submit else "",
            source_addr=submit.destination_addr if submit else "",
            destination_addr=submit.source_addr if submit else "",
            submit_date=submit.received_at if submit else datetime.now(UTC),
            original_text=submit.text if submit else "",
            stat=stat,
            err=err,
            fmt=fmt if fmt is not None else self.behaviour.receipt_format,
        )
        return await self._send_receipt(receipt)

    def _receiver(self, system_id: str) -> _Session | None:
        for session in self._sessions:
            if session.can_receive and (not system_id or session.system_id == system_id):
                return session
        return None

    async def _send_receipt(self, receipt: _Receipt, session: _Session | None = None) -> bool:
        session = session or self._receiver(receipt.system_id)
        if session is None:
            self.keep_for_rebind(receipt)
            log.info(
                "%s: no bound receiver for the receipt of %s; kept for the next bind",
                self.name,
                receipt.message_id,
                extra={"route": self.name, "system_id": receipt.system_id or None},
            )
            return False
        if not receipt.system_id:
            receipt.system_id = session.system_id
        text = receipt_text(
            receipt.message_id,
            stat=receipt.stat,
            err=receipt.err,
            submit_date=receipt.submit_date,
            done_date=receipt.done_date,
            original_text=receipt.original_text,
            fmt=receipt.fmt,
        )
        fields: dict[str, Any] = {
            "source_addr": receipt.source_addr,
            "destination_addr": receipt.destination_addr,
            "esm_class": ESM_DELIVERY_RECEIPT,
            "data_coding": DC_GSM7,
            "short_message": text.encode("ascii", errors="replace"),
        }
        if receipt.fmt.tlvs:
            fields["receipted_message_id"] = receipt.message_id
            fields["message_state"] = MESSAGE_STATES.get(receipt.stat.upper(), MESSAGE_STATES["UNKNOWN"])
        self._unacked.setdefault(receipt.system_id, {})[receipt.message_id] = receipt
        receipt.in_flight = True
        future = await session.deliver_sm(receipt, **fields)
        if future is None:
            receipt.in_flight = False
            return False
        session.spawn(self._await_ack(session, receipt, future))
        log.debug(
            "%s: receipt %s %s sent to %s",
            self.name,
            receipt.message_id,
            receipt.stat,
            session.system_id,
            extra={"route": self.name, "system_id": session.system_id},
        )
        return True

    async def _await_ack(self, session: _Session, receipt: _Receipt, future: asyncio.Future[bool]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), self.behaviour.receipt_ack_timeout_ms / 1000)
        if not future.done() or not future.result():
            receipt.in_flight = False
            log.info(
                "%s: receipt %s not acknowledged by %s; resent on the next bind",
                self.name,
                receipt.message_id,
                session.system_id,
                extra={"route": self.name, "system_id": session.system_id},
            )

    def keep_for_rebind(self, receipt: _Receipt) -> None:
        """Keep ``receipt`` until a later bind of its system (unless acknowledged meanwhile)."""
        self._unacked.setdefault(receipt.system_id, {})[receipt.message_id] = receipt

    def acknowledged(self, receipt: _Receipt) -> None:
        pending = self._unacked.get(receipt.system_id, {})
        if pending.get(receipt.message_id) is receipt:
            del pending[receipt.message_id]

    def resend_pending(self, session: _Session) -> None:
        """After a bind: resend the receipts this system never acknowledged."""
        pending = [r for r in self._unacked.get(session.system_id, {}).values() if not r.in_flight]
        pending += self._unacked.pop("", {}).values()  # receipts for ids of no known system
        if pending:
            log.info(
                "%s: resending %d unacknowledged receipts to %s",
                self.name,
                len(pending),
                session.system_id,
                extra={"route": self.name, "system_id": session.system_id},
            )
        for receipt in pending:
            session.spawn(self._resend(receipt, session))

    async def _resend(self, receipt: _Receipt, session: _Session) -> None:
        await self._send_receipt(receipt, session)

    async def deliver(self, source_addr: str, destination_addr: str, text: str) -> bool:
        """Send a mobile-originated ``deliver_sm`` (not a receipt) to a bound receiver/transceiver;
        False when none is bound."""
        session = self._receiver("")
        if session is None:
            return False
        body, data_coding = encode_text(text)
        fields: dict[str, Any] = {
            "source_addr": source_addr,
            "destination_addr": destination_addr,
            "esm_class": 0,
            "data_coding": data_coding,
        }
        if len(body) > MAX_SHORT_MESSAGE:
            fields["message_payload"] = body
        else:
            fields["short_message"] = body
        return await session.deliver_sm(None, **fields) is not None


__all__ = [
    "ReceiptFormat",
    "ReceivedSubmit",
    "SmscBehaviour",
    "SmscServer",
    "SubmitCheck",
    "SubmitHook",
    "decode_text",
    "receipt_text",
    "split_udh",
]
