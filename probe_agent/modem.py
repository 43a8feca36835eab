"""The agent's modem port: one GSM modem behind a small asyncio interface.

``ModemPort`` runs python-gsmmodem-new (through ``gsm_session``) in a worker thread of its own,
reads every SMS as a raw PDU, decodes and reassembles it (``received``), deletes it from the SIM
so storage never fills, and hands complete messages to asyncio. It recovers by itself from a
hung modem (re-initialise), an unplugged port (reopen with backoff) and full storage (empty it),
and shows each such event in ``state()``. Only this module and ``gsm_session`` touch the modem.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import queue
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gsmmodem.exceptions import (
    CmeError,
    CmsError,
    CommandError,
    IncorrectPinError,
    PinRequiredError,
    PukRequiredError,
    TimeoutException,
)
from serial import SerialException

from hardware.modem_profiles import PROFILES, get_profile
from hardware.sms_pdu import is_hex_pdu
from probe_agent.clock import utc_now, wall_ns
from probe_agent.gsm_session import GsmSession
from probe_agent.received import Origin, Part, Reassembler, ReceivedSms

log = logging.getLogger(__name__)

#: How long after a sweep's listing we wait for URCs the modem held back during it.
SWEEP_URC_GRACE_S = 0.05
#: A PDU read again within this window (a failed delete, a raced sweep) is not yielded twice.
DUPLICATE_WINDOW_S = 600.0
#: A failed read of an announced message is retried after this delay, this many times, before
#: the message is left to the listing of a later sweep.
READ_RETRY_DELAY_S = 0.5
READ_ATTEMPTS = 5
#: 27.005 §3.2.5: "invalid memory index", what most modems answer for an empty slot.
CMS_INVALID_INDEX = 321
#: Recovery events kept for ``state()``.
EVENTS_KEPT = 20

REGISTRATION = {
    0: "not_registered",
    1: "registered_home",
    2: "searching",
    3: "denied",
    4: "unknown",
    5: "registered_roaming",
}
#: Lines a modem writes when it (re)starts: mid-session they mean it reset itself and lost its
#: settings (echo, +CNMI, +CMEE, the unlocked PIN), so the port re-initialises it.
RESET_URCS = ("RDY", "^SYSSTART")
#: A stored message no +CMTI announced is read this long after a sweep first listed it: a URC
#: held back while the modem answered arrives well within it, and keeps the message's time.
UNANNOUNCED_GRACE_S = 1.0
#: Every this many polls a sweep reads all storages, for messages no indication announced.
FULL_SWEEP_EVERY_POLLS = 10
#: Storage-full indications of the known models, up to their first parameter.
STORAGE_FULL_URCS = tuple(p.storage_full_urc.split(",")[0] for p in PROFILES.values() if p.storage_full_urc)
_CMTI = re.compile(r'^\+CMTI:\s*"([^"]*)",\s*(\d+)')
_CMGR = re.compile(r"^\+CMGR:\s*(\d*)\s*,")
_CMGL = re.compile(r"^\+CMGL:\s*(\d+)\s*,")
_CPMS_TRIPLE = re.compile(r'"([^"]+)",\s*(\d+),\s*(\d+)')
_CSQ = re.compile(r"^\+CSQ:\s*(\d+)\s*,")
_CREG = re.compile(r"^\+CREG:\s*\d+\s*,\s*(\d+)")
_COPS = re.compile(r'^\+COPS:\s*\d+\s*,\s*(\d+)\s*,\s*"([^"]*)"')
_CNUM = re.compile(r'^\+CNUM:\s*"[^"]*"\s*,\s*"([^"]+)"')
_ICCID = re.compile(r"([0-9A-Fa-f]{18,22})")


@dataclass(frozen=True)
class ModemState:
    """What the port knows about its modem and SIM; None where not (yet) known."""

    port: str
    profile: str | None
    connected: bool = False
    registration: str | None = None
    operator: str | None = None
    mcc_mnc: str | None = None
    imsi: str | None = None
    iccid: str | None = None
    msisdn: str | None = None
    #: 27.007 RSSI 0..31 (None when the modem does not know) and the same in dBm.
    signal_rssi: int | None = None
    signal_dbm: int | None = None
    manufacturer: str | None = None
    model: str | None = None
    storage_memory: str | None = None
    storage_used: int | None = None
    storage_total: int | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    reconnects: int = 0
    messages_received: int = 0
    line_noise: int = 0
    #: Recent recovery events, newest last: ``"2026-11-26T10:00:00Z modem not answering: ..."``.
    events: tuple[str, ...] = ()
    updated_at: datetime | None = None


class FatalModemError(RuntimeError):
    """A problem retrying cannot fix (a wrong or missing PIN): the port stops trying."""


@dataclass
class _Backoff:
    initial_s: float
    max_s: float
    current_s: float = 0.0

    def next(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.initial_s)
        return self.current_s * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current_s = 0.0


@dataclass
class _Worker:
    """State only the worker thread touches."""

    session: GsmSession | None = None
    unread: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Slots read but not yet deleted, with their PDU: the consumer has not taken them yet.
    held: dict[tuple[str, int], str] = field(default_factory=dict)
    #: +CMT PDUs seen lately (monotonic time), to drop a repeat.
    recent: OrderedDict[str, float] = field(default_factory=OrderedDict)
    pending_deletes: list[tuple[list[tuple[str, int]], frozenset[str] | None]] = field(default_factory=list)
    ready_ns: int = 0
    #: Slots a sweep listed without an indication: first seen (monotonic), origin, PDU.
    unannounced: dict[tuple[str, int], tuple[float, Origin, str]] = field(default_factory=dict)
    polls: int = 0
    full_reported: bool = False
    next_poll: float = 0.0
    sweep_at: float | None = None
    connected_once: bool = False
    fatal: str | None = None
    #: Storages that can hold received messages, all swept (SIM and modem memory).
    storages: list[str] = field(default_factory=lambda: ["SM"])
    read_attempts: dict[tuple[str, int], int] = field(default_factory=dict)


class ModemPort:
    """One modem: ``async for sms in port.received()`` and ``await port.state()``."""

    def __init__(
        self,
        port: str,
        pin: str | None = None,
        profile: str | None = None,
        *,
        poll_interval_s: float = 30.0,
        command_timeout_s: float = 5.0,
        part_timeout_s: float = 120.0,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        direct_delivery: bool = False,
    ) -> None:
        if profile is not None:
            get_profile(profile)  # a clear error for an unknown profile, before any I/O
        self.port = port
        self.pin = pin
        self.profile = profile
        self.poll_interval_s = poll_interval_s
        self.command_timeout_s = command_timeout_s
        self.direct_delivery = direct_delivery
        self._reassembler = Reassembler(part_timeout_s)
        self._backoff = _Backoff(reconnect_initial_s, reconnect_max_s)
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._state = ModemState(port=port, profile=profile)
        self._state_lock = threading.Lock()
        self._w = _Worker()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: asyncio.Queue[ReceivedSms | None] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._unacked: dict[int, ReceivedSms] = {}

    # --- asyncio face ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker; it connects, reads what is stored, then listens."""
        self._loop = asyncio.get_running_loop()
        self._out = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name=f"modem {self.port}", daemon=True)
        self._thread.start()

    async def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """True once the modem is connected, initialised and what it had stored was read
        (False after ``timeout_s``)."""
        return await asyncio.to_thread(self._connected.wait, timeout_s)

    async def stop(self) -> None:
        """Close the modem; partial messages still waiting are yielded, flagged, before the end."""
        self._stopping.set()
        self._events.put(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def __aenter__(self) -> ModemPort:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def received(self, auto_ack: bool = True) -> AsyncIterator[ReceivedSms]:
        """Complete received messages, in the order they completed, until the port stops.

        A message leaves the SIM only once the consumer has taken it: when it asks for the next
        one (``auto_ack``), or calls ``ack()``. A consumer killed in between finds it again after
        a restart (at least once; the agent's observation id is stable, so duplicates can be
        removed). Without ``auto_ack`` the consumer acks each message itself, for example once
        a batch of them is on disk.
        """
        assert self._out is not None, "start() the port first"
        while True:
            sms = await self._out.get()
            if sms is None:
                return
            self._unacked[id(sms)] = sms
            yield sms
            if auto_ack:
                self.ack(sms)

    def ack(self, sms: ReceivedSms) -> None:
        """The consumer has made ``sms`` durable: delete its parts from storage (once)."""
        if self._unacked.pop(id(sms), None) is not None and sms.storage:
            self._events.put(("delete", list(sms.storage), frozenset(sms.pdus)))

    async def state(self, refresh: bool = False, timeout_s: float = 5.0) -> ModemState:
        """The modem's state; with ``refresh`` it is queried first (else the last poll's)."""
        if refresh and self._thread is not None and self._thread.is_alive():
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._events.put(("refresh", done))
            with contextlib.suppress(TimeoutError, concurrent.futures.TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)
        with self._state_lock:
            return self._state

    # --- worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._w.session is None:
                    if self._w.fatal or not self._open():
                        self._wait_event(None if self._w.fatal else self._backoff.next())
                    continue
                self._serve_once()
        except Exception as exc:  # the worker must never die silently
            log.exception("modem worker for %s crashed", self.port)
            self._record_error(f"worker crashed: {exc!r}")
        finally:
            self._close_session()
            for sms in self._reassembler.flush():
                self._emit(sms)
            self._emit(None)

    def _wait_event(self, timeout_s: float | None) -> None:
        """Sleep while disconnected, still answering refresh and stop."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stopping.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                return
            kind = event[0]
            if kind == "refresh":
                event[1].set_result(None)
            elif kind == "delete":
                self._w.pending_deletes.append((event[1], event[2]))
            elif kind == "cmti":  # read after the reconnect, with its URC time
                self._w.unread[(event[1], event[2])] = event[3]
            elif kind == "cmt":  # never stored: this is the only copy
                self._take(Part.read(event[1], event[2], Origin.CMT))
            elif kind == "stop":
                return

    def _open(self) -> bool:
        session = GsmSession(
            self.port,
            on_urc=self._on_urc,
            on_fatal=lambda exc: self._events.put(("fatal", exc)),
            command_timeout_s=self.command_timeout_s,
            cnmi="2,2,0,0,0" if self.direct_delivery else "2,1,0,0,0",
        )
        try:
            session.connect(pin=self.pin)
            self._w.session = session
            self._identify()
            self._poll()
            self._w.ready_ns = wall_ns()
            pending, self._w.pending_deletes = self._w.pending_deletes, []
            for slots, pdus in pending:
                self._delete(slots, pdus)
            self._sweep(Origin.SWEEP if self._w.connected_once else Origin.STARTUP)
        except (IncorrectPinError, PinRequiredError, PukRequiredError) as exc:
            session.close_quietly()
            self._w.session = None
            why = {
                IncorrectPinError: "incorrect SIM PIN",
                PinRequiredError: "SIM PIN required but none configured",
                PukRequiredError: "SIM locked: PUK required",
            }[type(exc)]
            self._w.fatal = why
            self._record_error(f"{why}; not retrying (a wrong PIN would lock the SIM)")
            return False
        except Exception as exc:  # unplugged, hung, SIM missing: all retried with backoff
            session.close_quietly()
            self._w.session = None
            self._record_error(f"cannot open modem: {_describe(exc)}")
            return False
        self._backoff.reset()
        first = not self._w.connected_once
        if not first:
            self._update(reconnects=self._state.reconnects + 1)
            self._record_event("reconnected")
        self._w.connected_once = True
        self._connected.set()
        return True

    def _serve_once(self) -> None:
        now = time.monotonic()
        deadlines = [self._w.next_poll]
        if self._w.sweep_at is not None:
            deadlines.append(self._w.sweep_at)
        part_deadline = self._reassembler.next_deadline()
        if part_deadline is not None:
            deadlines.append(part_deadline)
        try:
            event = self._events.get(timeout=max(0.0, min(deadlines) - now))
        except queue.Empty:
            event = None
        try:
            if event is not None:
                self._handle(event)
            if self._w.session is not None and time.monotonic() >= self._w.next_poll:
                self._poll()
                self._w.polls += 1
                unannounced = (self._state.storage_used or 0) > self._held_in(self._state.storage_memory)
                if self._events.empty() and (unannounced or self._w.polls % FULL_SWEEP_EVERY_POLLS == 0):
                    self._sweep(Origin.SWEEP)
            sweep_at = self._w.sweep_at
            if self._w.session is not None and sweep_at is not None and time.monotonic() >= sweep_at:
                self._sweep(Origin.SWEEP)
        except TimeoutException as exc:
            self._lost(f"modem not answering ({_describe(exc)}); re-initialising")
        except CommandError as exc:
            if _sim_gone(exc):
                self._lost(f"{_describe(exc)}; re-initialising")
            else:
                self._record_error(f"command failed: {_describe(exc)}")
        except (SerialException, OSError) as exc:
            self._lost(f"port error: {_describe(exc)}; reopening")
        except Exception as exc:  # anything unforeseen: start the modem afresh, never stop serving
            log.warning("modem %s: unexpected %r; re-initialising", self.port, exc, exc_info=True)
            self._lost(f"unexpected error: {_describe(exc)}; re-initialising")
        for sms in self._reassembler.expire():
            self._emit(sms)

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "cmti":
            _, memory, index, ns = event
            self._w.unread[(memory, index)] = ns
            self._read_one(memory, index)
        elif kind == "cmt":
            self._take(Part.read(event[1], event[2], Origin.CMT))
        elif kind == "delete":
            self._delete(event[1], event[2])
        elif kind == "reset":
            if event[2] > self._w.ready_ns:  # not the boot banner of our own connect
                self._lost(f"modem restarted by itself ({event[1]!r}); re-initialising")
        elif kind == "full":
            self._record_event(f"storage full ({event[1]}); emptying it")
            self._sweep(Origin.SWEEP)
        elif kind == "fatal":
            self._lost(f"port lost: {_describe(event[1])}")
        elif kind == "refresh":
            try:
                if self._w.session is not None:
                    self._poll()
            finally:
                event[1].set_result(None)

    def _on_urc(self, line: str, ns: int) -> None:
        """Reader thread: classify one unsolicited line, queue it for the worker."""
        m = _CMTI.match(line)
        if m:
            self._events.put(("cmti", m.group(1), int(m.group(2)), ns))
        elif line.startswith("+CMT:"):
            self._events.put(("cmt", line.split("\n", 1)[1].strip(), ns))
        elif line.startswith(STORAGE_FULL_URCS):
            self._events.put(("full", line))
        elif line.startswith(RESET_URCS):
            self._events.put(("reset", line, ns))
        else:
            log.debug("modem %s: unsolicited %r", self.port, line)

    # --- reading -------------------------------------------------------------------------------

    def _session(self) -> GsmSession:
        assert self._w.session is not None
        return self._w.session

    def _read_one(self, memory: str, index: int) -> None:
        """Read the message a +CMTI announced; a failed read is retried a few times, and the
        URC's time is kept for it whichever way it is finally read."""
        key = (memory, index)
        session = self._session()
        try:
            session._setSmsMemory(readDelete=memory)
            lines = session.write(f"AT+CMGR={index}") or []
        except CmsError as exc:
            if exc.code == CMS_INVALID_INDEX:  # an empty slot: a sweep already took it
                self._w.unread.pop(key, None)
                return
            attempts = self._w.read_attempts[key] = self._w.read_attempts.get(key, 0) + 1
            if attempts >= READ_ATTEMPTS:
                # Leave it to the listing of a later sweep (AT+CMGL), which keeps the URC's time.
                self._record_error(f"reading {memory} {index} failed {attempts} times: {exc}")
                self._w.read_attempts.pop(key, None)
            else:
                self._record_error(f"reading {memory} {index} failed: {exc}; retrying")
            self._w.sweep_at = time.monotonic() + READ_RETRY_DELAY_S
            return
        self._w.read_attempts.pop(key, None)
        pdu = _pdu_after(lines, _CMGR)
        if pdu is None:  # an empty slot (bare OK, as the SIM800 answers): a sweep took it
            self._w.unread.pop(key, None)
            return
        ns = self._w.unread.pop(key)
        self._w.unannounced.pop(key, None)
        self._take(Part.read(pdu, ns, Origin.CMTI, memory, index))

    def _sweep(self, origin: Origin) -> None:
        """Read and delete everything stored, in every message storage: at start-up, when
        storage is full, after read errors, or when a poll finds messages nobody announced."""
        session = self._session()
        self._w.sweep_at = None
        self._drain_indications()
        listed: list[tuple[str, int, str]] = []
        swept: set[str] = set()
        for memory in self._w.storages:
            try:
                session._setSmsMemory(readDelete=memory)
                lines = session.write("AT+CMGL=4", timeout=max(self.command_timeout_s, 30.0)) or []
            except CmsError as exc:
                self._record_error(f"listing {memory} storage failed: {exc}")
                self._w.sweep_at = time.monotonic() + READ_RETRY_DELAY_S
                continue
            swept.add(memory)
            listed += [(memory, index, pdu) for index, pdu in _listing(lines)]
        time.sleep(SWEEP_URC_GRACE_S)  # URCs the modem held back while it answered
        self._drain_indications()
        now = time.monotonic()
        for memory, index, pdu in listed:
            slot = (memory, index)
            ns = self._w.unread.pop(slot, None)
            if ns is not None:
                self._w.unannounced.pop(slot, None)
                self._take(Part.read(pdu, ns, Origin.CMTI, memory, index))
                continue
            if self._w.held.get(slot) == pdu:
                continue  # the consumer has it already
            # Listed but not announced (yet): its +CMTI may still be on the way, and reading it
            # now would lose the URC's time. Take it only once it stays unannounced a while.
            seen = self._w.unannounced.get(slot)
            if seen is None or seen[2] != pdu:
                seen = self._w.unannounced[slot] = (now, origin, pdu)
            if now - seen[0] >= UNANNOUNCED_GRACE_S:
                del self._w.unannounced[slot]
                self._take(Part.read(pdu, wall_ns(), seen[1], memory, index))
            else:
                self._w.sweep_at = min(self._w.sweep_at or math.inf, seen[0] + UNANNOUNCED_GRACE_S)
        # Announced but not listed: stored just after the listing. Read each now, not at the
        # next poll, or its latency would be off by a whole poll interval.
        for memory, index in [k for k in self._w.unread if k[0] in swept and k not in self._w.read_attempts]:
            self._read_one(memory, index)
        if listed:
            log.info("modem %s: %d message(s) read from storage (%s)", self.port, len(listed), origin)
            self._poll_storage()

    def _drain_indications(self) -> None:
        """Move queued +CMTI stamps into ``unread`` so a sweep can use them; keep the rest."""
        keep = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "cmti":
                self._w.unread[(event[1], event[2])] = event[3]
            else:
                keep.append(event)
        for event in keep:
            self._events.put(event)

    def _take(self, part: Part) -> None:
        """Pass a read part on, once: it stays in storage (held) until the consumer has it."""
        slot = (part.memory, part.index) if part.memory is not None and part.index is not None else None
        held = self._w.held
        if slot is not None:
            if held.get(slot) == part.pdu:
                return  # read again by a sweep while the consumer still has it
            if part.pdu in held.values():
                log.info("modem %s: the same PDU stored twice; deleting the copy at %s", self.port, slot)
                self._delete([slot], None)
                return
            held[slot] = part.pdu
        else:  # +CMT: nothing in storage to tell a repeat by, so remember what came lately
            now = time.monotonic()
            recent = self._w.recent
            while recent and next(iter(recent.values())) < now - DUPLICATE_WINDOW_S:
                recent.popitem(last=False)
            if part.pdu in recent:
                return
            recent[part.pdu] = now
        sms = self._reassembler.add(part)
        if sms is not None:
            self._emit(sms)

    def _held_in(self, memory: str | None) -> int:
        return sum(1 for m, _ in self._w.held if m == memory)

    def _delete(self, slots: list[tuple[str, int]], pdus: frozenset[str] | None) -> None:
        """Delete the slots of a message the consumer has taken; only while they still hold
        that message's PDUs (``pdus`` None: a duplicate copy), so a late or repeated
        acknowledgement never deletes a newer message stored in a freed slot."""
        if self._w.session is None:
            self._w.pending_deletes.append((slots, pdus))
            return
        session = self._session()
        deleted = 0
        for memory, index in slots:
            slot = (memory, index)
            if pdus is not None and self._w.held.get(slot) not in pdus:
                continue
            try:
                session._setSmsMemory(readDelete=memory)  # never delete in the wrong storage
                session.write(f"AT+CMGD={index},0")
            except CmsError as exc:
                self._record_error(f"deleting {memory} {index} failed: {exc}")
                continue
            self._w.held.pop(slot, None)
            deleted += memory == self._state.storage_memory
        if deleted and self._state.storage_used:  # keep the shown use current between polls
            self._update(storage_used=max(0, self._state.storage_used - deleted))

    def _emit(self, sms: ReceivedSms | None) -> None:
        if sms is not None:
            self._update(messages_received=self._state.messages_received + 1)
            log.info(
                "modem %s: SMS from %s, %d part(s)%s",
                self.port,
                sms.sender,
                sms.parts,
                " PARTIAL" if sms.partial else "",
            )
        loop, out = self._loop, self._out
        if loop is None or out is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to hand to
            loop.call_soon_threadsafe(out.put_nowait, sms)

    # --- state ----------------------------------------------------------------------------------

    def _identify(self) -> None:
        s = self._session()
        info: dict[str, Any] = {"manufacturer": s.manufacturer, "model": s.model, "imsi": s.imsi}
        info["iccid"] = self._iccid()
        self._w.storages = self._message_storages()
        enable = get_profile(self.profile).storage_full_urc_enable if self.profile else None
        if enable:
            s.write("AT" + enable, parseError=False)
        with contextlib.suppress(CommandError):
            cnum = _first_match(s.write("AT+CNUM") or [], _CNUM)
            info["msisdn"] = cnum.group(1) if cnum else None
        self._update(**info)

    def _message_storages(self) -> list[str]:
        """SIM and modem memory where offered: a message can sit in either, whichever the
        library picked for new ones. Combined (MT), report and broadcast storages are skipped."""
        try:
            answer = " ".join(self._session().write("AT+CPMS=?") or [])
        except CommandError:
            return ["SM"]
        first = answer.split(")")[0]
        return [m for m in ("SM", "ME") if f'"{m}"' in first] or ["SM"]

    def _iccid(self) -> str | None:
        commands = ["AT+CCID", "AT+QCCID", "AT^ICCID?", "AT+ICCID"]
        if self.profile:
            commands.insert(0, "AT" + get_profile(self.profile).iccid_command)
        for command in dict.fromkeys(commands):
            try:
                lines = self._session().write(command) or []
            except CommandError:
                continue
            for line in lines:
                m = _ICCID.search(line)
                if m:
                    return m.group(1).upper().rstrip("F")
        return None

    def _poll(self) -> None:
        s = self._session()
        self._w.next_poll = time.monotonic() + self.poll_interval_s
        info: dict[str, Any] = {"connected": True}
        csq = _first_match(s.write("AT+CSQ") or [], _CSQ)
        rssi = int(csq.group(1)) if csq else 99
        info["signal_rssi"] = rssi if rssi != 99 else None
        info["signal_dbm"] = -113 + 2 * rssi if rssi != 99 else None
        creg = _first_match(s.write("AT+CREG?") or [], _CREG)
        info["registration"] = REGISTRATION.get(int(creg.group(1)), "unknown") if creg else "unknown"
        s.write("AT+COPS=3,0", parseError=False)
        cops = _first_match(s.write("AT+COPS?") or [], _COPS)
        info["operator"] = cops.group(2) if cops else None
        s.write("AT+COPS=3,2", parseError=False)
        cops = _first_match(s.write("AT+COPS?") or [], _COPS)
        info["mcc_mnc"] = cops.group(2) if cops else None
        info["line_noise"] = s.noise_lines
        self._update(**info)
        self._poll_storage()

    def _poll_storage(self) -> None:
        """Use of the storage new messages land in (``+CPMS`` mem3); full and not all of it
        held for the consumer means messages nobody announced: sweep."""
        try:
            lines = self._session().write("AT+CPMS?") or []
        except CmsError as exc:
            self._record_error(f"storage query failed: {exc}")
            return
        triples = _CPMS_TRIPLE.findall(" ".join(line for line in lines if line.startswith("+CPMS")))
        if not triples:
            return
        memory, used_text, total_text = triples[-1]
        used, total = int(used_text), int(total_text)
        self._update(storage_memory=memory, storage_used=used, storage_total=total)
        full = bool(total) and used >= total
        if full and used > self._held_in(memory):
            self._record_event(f"storage full ({used}/{total}); emptying it")
            self._w.sweep_at = time.monotonic()
        elif full and not self._w.full_reported:
            self._record_event(f"storage full ({used}/{total}): every message awaits the consumer")
            self._w.full_reported = True
        if not full:
            self._w.full_reported = False

    def _lost(self, why: str) -> None:
        self._record_error(why)
        self._close_session()
        self._update(connected=False)

    def _close_session(self) -> None:
        if self._w.session is not None:
            self._w.session.close_quietly()
            self._w.session = None

    def _update(self, **changes: Any) -> None:
        with self._state_lock:
            self._state = replace(self._state, updated_at=_now(), **changes)

    def _record_event(self, text: str) -> None:
        log.warning("modem %s: %s", self.port, text)
        with self._state_lock:
            events = (*self._state.events, f"{_now().isoformat()} {text}")[-EVENTS_KEPT:]
            self._state = replace(self._state, events=events, updated_at=_now())

    def _record_error(self, text: str) -> None:
        self._record_event(text)
        self._update(last_error=text, last_error_at=_now())


def _now() -> datetime:
    return utc_now()


def _sim_gone(exc: BaseException) -> bool:
    """CME 10/13: the SIM was taken out or failed; only a re-initialisation finds it again."""
    return isinstance(exc, CmeError) and getattr(exc, "code", None) in (10, 13)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CmeError) and getattr(exc, "code", None) == 10:
        return "SIM not inserted"
    if isinstance(exc, TimeoutException):
        return "no answer within the command timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _first_match(lines: list[str], pattern: re.Pattern[str]) -> re.Match[str] | None:
    for line in lines:
        m = pattern.match(line)
        if m:
            return m
    return None


def _pdu_after(lines: list[str], header: re.Pattern[str]) -> str | None:
    """The PDU line after a ``+CMGR:`` header, skipping any noise lines in between."""
    for i, line in enumerate(lines):
        if header.match(line):
            for candidate in lines[i + 1 :]:
                if is_hex_pdu(candidate):
                    return candidate
    return None


def _listing(lines: list[str]) -> list[tuple[int, str]]:
    """(index, PDU) pairs of a PDU-mode ``+CMGL`` answer."""
    out = []
    index: int | None = None
    for line in lines:
        m = _CMGL.match(line)
        if m:
            index = int(m.group(1))
        elif index is not None and is_hex_pdu(line):
            out.append((index, line))
            index = None
    return out
