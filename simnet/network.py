"""simnet's running network: one SMSC per route, one virtual modem per handset, and between them
each route's quality profile, applied to every message, with a ground-truth record of its fate.

Every submit is judged by the profile in force at that moment (changes by ``after_s`` since the
start, or by ``at_share`` of ``duration_s``): refused (``error_rate``, answered ESME_RSYSERR), or
accepted and then lost or delivered after a latency drawn from the route's distribution, with
the sender, text and SMSC address the route gives it. A long message's parts are one message,
delivered once all parts are in. Receipts are simnet's own (the SMSCs' automatic ones are off),
so a route can lie: a lost message may still be reported DELIVRD. Randomness is seeded per route,
so a scenario, a seed and the same submits give the same fates.

The SMSC timestamp (SCTS) in the delivered PDU is the moment the route handed the message to the
operator's SMSC: the submit (of its last part) plus ``handover_share`` of the drawn latency, cut
to whole seconds as the PDU carries it, in UTC. So it lies between the submit and the delivery,
nearer the submit on a direct route and nearer the delivery on a long grey chain.

The truth is what really happened, for tests and the demo to compare with what the controller
measured: one record per message in ``network.truth`` and as a JSON line in
``workdir/truth.jsonl``, written when the message's fate is final (after its receipt, if any).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import re
import time
import unicodedata
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import smpplib.consts

from hardware.sms_pdu import is_gsm7
from hardware.virtual_modem import Delivery, SimCard, StorageFullError, VirtualModem
from simnet.scenario import ContentChanges, Latency, Network, Route, RouteProfile, Scenario
from simnet.smsc import ReceivedSubmit, SmscBehaviour, SmscServer, decode_text

log = logging.getLogger(__name__)

Fate = Literal["delivered", "lost", "refused", "storage_full", "no_handset", "incomplete", "stopped"]

#: A long message whose parts have not all arrived after this long is given up ("incomplete").
CONCAT_TIMEOUT_S = 60.0
#: The receipt's ``err:`` field: none, or a generic failure.
ERR_NONE = "000"
ERR_FAILED = "001"
#: SMPP source_addr_ton values that matter here.
TON_INTERNATIONAL = 1
TON_ALPHANUMERIC = 5
#: A one-time code: the first run of 4-8 digits standing alone.
_CODE = re.compile(r"(?<!\d)\d{4,8}(?!\d)")


@dataclass(frozen=True)
class RouteEndpoint:
    """Where and how to bind to one route's SMSC."""

    name: str
    host: str
    port: int
    system_id: str
    password: str


@dataclass(frozen=True)
class HandsetInfo:
    """One handset: the Pi it belongs to, its modem's port link and its SIM."""

    pi: str
    modem: str
    port: str
    profile: str
    imsi: str
    iccid: str
    msisdn: str
    mcc_mnc: str
    operator: str
    country: str


@dataclass
class TruthRecord:
    """What really happened to one submitted message (a long one's parts are one message).

    Fates: ``delivered``; ``lost`` by the route (``fake_receipt`` when it still said DELIVRD);
    ``refused`` (answered ESME_RSYSERR: one record per refused submit, a part included);
    ``storage_full`` (the handset had no room); ``no_handset`` (no such number: UNDELIV);
    ``incomplete`` (a long message whose parts never all arrived); ``stopped`` (the network
    stopped before its delivery was due).
    """

    route: str
    #: The SMSC's message id (of the first part), None for a refused submit.
    message_id: str | None
    #: Every part's message id, in part order (a part submitted twice has two).
    message_ids: list[str]
    parts: int
    system_id: str
    #: E.164, with the ``+``.
    destination: str
    #: As the ESME sent it: ``+`` and digits for an international number, else as given.
    sender_sent: str
    text_sent: str
    #: When the SMSC got the (first part's) submit, UTC.
    received_at: datetime
    fate: Fate
    #: The route's profile in force: 0 the initial one, k after the k-th change (in time order).
    profile_phase: int
    #: The destination handset, when there is one.
    pi: str | None = None
    modem: str | None = None
    #: The latency drawn for it, ms (None when refused or for no handset).
    latency_ms: float | None = None
    #: The modem's ``urc_at``: when the handset was told (None when not delivered, or no URC).
    delivered_at: datetime | None = None
    sender_delivered: str | None = None
    text_delivered: str | None = None
    smsc_address: str | None = None
    #: The SMSC timestamp in the PDU (whole seconds, UTC).
    scts: datetime | None = None
    receipt_stat: str | None = None
    #: When the receipt was handed to the SMSC (sent then, or kept for the next bind).
    receipt_at: datetime | None = None
    #: A DELIVRD receipt for a message that never arrived.
    fake_receipt: bool = False
    #: Why it was refused or not delivered, when there is more to say than the fate.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; times as ISO 8601 UTC strings."""
        return {
            key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass
class _Handset:
    info: HandsetInfo
    network: Network
    sim: SimCard
    #: Made and started by ``start()``.
    modem: VirtualModem | None = None
    #: One delivery at a time per modem, in the order they became due.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Message:
    """An accepted message, all its parts in order."""

    parts: list[ReceivedSubmit]
    text: str
    message_ids: list[str]

    @property
    def first(self) -> ReceivedSubmit:
        return self.parts[0]

    @property
    def complete_at(self) -> datetime:
        """When its last part arrived: the route starts carrying it then."""
        return max(p.received_at for p in self.parts)


@dataclass
class _Assembly:
    """The parts of a long message that have arrived so far."""

    total: int
    parts: dict[int, ReceivedSubmit] = field(default_factory=dict)
    message_ids: list[str] = field(default_factory=list)
    timer: asyncio.Task[None] | None = None


class _RouteRun:
    """One route while the network runs: its SMSC, its phases and its random numbers."""

    def __init__(self, route: Route, duration_s: float | None, seed: int) -> None:
        self.route = route
        self.name = route.name
        #: Seeded per route, so one route's traffic never changes another's draws; refusals (drawn
        #: in the SMSC's read loop) have their own, so they never shift the fates (drawn in order
        #: by the submit hook).
        self.rng = random.Random(f"{seed}:{route.name}")
        self.refusal_rng = random.Random(f"{seed}:{route.name}:refusals")
        timed = sorted(
            (moment, i, change.profile)
            for i, change in enumerate(route.changes)
            if (moment := change.moment_s(duration_s)) is not None
        )
        self.phases: list[tuple[float, RouteProfile]] = [(0.0, route.profile)]
        for moment, _, change in timed:
            self.phases.append((moment, self.phases[-1][1].merged(change)))
        self.never = len(route.changes) - len(timed)
        self.server: SmscServer | None = None

    def profile_at(self, elapsed_s: float) -> tuple[int, RouteProfile]:
        """The phase in force ``elapsed_s`` after the start, and its profile."""
        phase = 0
        for index, (moment, _) in enumerate(self.phases):
            if moment <= elapsed_s:
                phase = index
        return phase, self.phases[phase][1]


class SimNetwork:
    """A scenario running: SMSCs on free loopback ports, virtual modems under ``workdir/modems``."""

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        *,
        duration_s: float | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.scenario = scenario
        self.workdir = Path(workdir)
        self.duration_s = duration_s
        self.seed = seed
        self.host = host
        self.truth_path = self.workdir / "truth.jsonl"
        #: Every message's record, in the order their fates became final.
        self.truth: list[TruthRecord] = []
        self.started_at: datetime | None = None
        self._runs = {route.name: _RouteRun(route, duration_s, seed) for route in scenario.routes}
        self._handsets: dict[str, _Handset] = {}  # by MSISDN digits
        self._by_modem: dict[tuple[str, str], _Handset] = {}
        for pi in scenario.pis:
            for handset in pi.handsets:
                network = scenario.network(handset.mcc_mnc)
                link = self.workdir / "modems" / pi.id / handset.modem
                info = HandsetInfo(
                    pi=pi.id,
                    modem=handset.modem,
                    port=str(link),
                    profile=handset.profile,
                    imsi=handset.imsi,
                    iccid=handset.iccid,
                    msisdn=handset.msisdn,
                    mcc_mnc=handset.mcc_mnc,
                    operator=network.operator,
                    country=network.country,
                )
                sim = SimCard(
                    imsi=handset.imsi,
                    iccid=handset.iccid,
                    msisdn=handset.msisdn,
                    smsc=network.smsc_addresses[0],
                    operator=network.operator,
                    mcc_mnc=handset.mcc_mnc,
                )
                entry = _Handset(info, network, sim)
                self._handsets[handset.msisdn.removeprefix("+")] = entry
                self._by_modem[(pi.id, handset.modem)] = entry
        self._state: Literal["new", "running", "stopped"] = "new"
        self._started_mono = 0.0
        self._modems_started: list[VirtualModem] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._phase_tasks: list[asyncio.Task[None]] = []
        self._assemblies: dict[tuple[Any, ...], _Assembly] = {}
        self._handled: set[tuple[str, str]] = set()  # (route, message id) seen by the hook
        self._truth_file: IO[str] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every modem, then every route's SMSC; ``routes`` then has their ports."""
        if self._state != "new":
            return
        self._state = "running"
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._truth_file = self.truth_path.open("a", encoding="utf-8")
        for entry in self._by_modem.values():
            Path(entry.info.port).parent.mkdir(parents=True, exist_ok=True)
            entry.modem = VirtualModem(entry.info.profile, link=entry.info.port, sim=entry.sim)
            await asyncio.to_thread(entry.modem.start)
            self._modems_started.append(entry.modem)
            log.info(
                "modem %s (%s, %s) on %s",
                entry.info.modem,
                entry.info.profile,
                entry.info.msisdn,
                entry.info.port,
                extra={"agent": entry.info.pi, "modem": entry.info.modem},
            )
        self.started_at = datetime.now(UTC)
        self._started_mono = time.monotonic()
        for run in self._runs.values():
            if run.never:
                log.info(
                    "%s: %d profile change(s) by at_share never happen: the run has no duration",
                    run.name,
                    run.never,
                    extra={"route": run.name},
                )
            run.server = SmscServer(
                system_id=run.route.system_id,
                password=run.route.password,
                host=self.host,
                behaviour=SmscBehaviour(receipts=False, max_submits_per_s=run.phases[0][1].max_submits_per_s),
                name=run.name,
                on_submit=partial(self._on_submit, run),
                check_submit=partial(self._check_submit, run),
            )
            await run.server.start()
            if len(run.phases) > 1:
                self._phase_tasks.append(asyncio.create_task(self._follow_phases(run)))
        log.info(
            "simnet running: %s; truth in %s",
            self.scenario.summary(),
            self.truth_path,
        )

    async def stop(self) -> None:
        """Stop taking submits, settle what is in flight (its truth recorded as it stands), stop
        every SMSC and modem. Safe to call twice."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        for task in self._phase_tasks:
            task.cancel()
        await asyncio.gather(*self._phase_tasks, return_exceptions=True)
        servers = [run.server for run in self._runs.values() if run.server is not None]
        await asyncio.gather(*(server.stop() for server in servers), return_exceptions=True)
        self._settle_unhandled()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._assemblies):
            self._give_up(key, "the network stopped")
        for modem in self._modems_started:
            await asyncio.to_thread(modem.stop)
        self._modems_started.clear()
        if self._truth_file is not None:
            self._truth_file.close()
            self._truth_file = None
        log.info("simnet stopped: %d messages recorded", len(self.truth))

    async def __aenter__(self) -> SimNetwork:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- what runs, for other processes ------------------------------------------------------------

    @property
    def routes(self) -> list[RouteEndpoint]:
        """Each route's SMSC (the port is known once started)."""
        return [
            RouteEndpoint(
                name=run.name,
                host=self.host,
                port=run.server.port if run.server is not None else 0,
                system_id=run.route.system_id,
                password=run.route.password,
            )
            for run in self._runs.values()
        ]

    @property
    def handsets(self) -> list[HandsetInfo]:
        """Every handset, Pi by Pi."""
        return [entry.info for entry in self._by_modem.values()]

    def modem(self, pi: str, modem: str) -> VirtualModem:
        """The virtual modem of handset ``modem`` on Pi ``pi`` (once started); KeyError when none."""
        found = self._by_modem[(pi, modem)].modem
        if found is None:
            raise KeyError(f"modem {modem} of {pi} is not running")
        return found

    def server(self, route: str) -> SmscServer:
        """The SMSC of ``route`` (once started); KeyError when none."""
        server = self._runs[route].server
        if server is None:
            raise KeyError(f"route {route} is not running")
        return server

    def describe(self) -> dict[str, Any]:
        """Routes, handsets, Pis and networks as JSON-able data, for other processes."""
        return {
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration_s": self.duration_s,
            "seed": self.seed,
            "truth": str(self.truth_path),
            "routes": [dataclasses.asdict(route) for route in self.routes],
            "handsets": [dataclasses.asdict(handset) for handset in self.handsets],
            "pis": [
                {"id": pi.id, "clock_shift_s": pi.clock_shift_s, "modems": [h.modem for h in pi.handsets]}
                for pi in self.scenario.pis
            ],
            "networks": [network.model_dump() for network in self.scenario.networks],
        }

    # -- submits ------------------------------------------------------------------------------------

    def _elapsed_s(self, at: datetime) -> float:
        assert self.started_at is not None
        return (at - self.started_at).total_seconds()

    def _check_submit(self, run: _RouteRun, submit: ReceivedSubmit) -> int | None:
        """Refuse a submit with ESME_RSYSERR at the route's error rate (recorded as refused)."""
        phase, profile = run.profile_at(self._elapsed_s(submit.received_at))
        if profile.error_rate <= 0 or run.refusal_rng.random() >= profile.error_rate:
            return None
        record = TruthRecord(
            route=run.name,
            message_id=None,
            message_ids=[],
            parts=1,
            system_id=submit.system_id,
            destination=_e164(submit.destination_addr),
            sender_sent=_sender(submit),
            text_sent=submit.text,
            received_at=submit.received_at,
            fate="refused",
            profile_phase=phase,
            error="ESME_RSYSERR"
            + (f" (part {submit.concat[2]} of {submit.concat[1]})" if submit.concat else ""),
        )
        self._record(record)
        return int(smpplib.consts.SMPP_ESME_RSYSERR)

    def _on_submit(self, run: _RouteRun, submit: ReceivedSubmit) -> None:
        """An accepted submit, in order: a whole message is dispatched, a part waits for the rest."""
        self._handled.add((run.name, submit.message_id))
        message = self._collect(run, submit)
        if message is not None:
            self._dispatch(run, message)

    def _collect(self, run: _RouteRun, submit: ReceivedSubmit) -> _Message | None:
        """The whole message once ``submit`` completes it (itself when it is no part)."""
        if submit.concat is None or submit.concat[1] <= 1:
            return _Message([submit], submit.text, [submit.message_id])
        ref, total, seq = submit.concat
        key = (run.name, submit.system_id, submit.source_addr, submit.destination_addr, ref, total)
        assembly = self._assemblies.get(key)
        if assembly is None:
            assembly = self._assemblies[key] = _Assembly(total)
            if self._state == "running":
                assembly.timer = self._spawn(self._expire(key))
        assembly.parts[seq] = submit  # a part sent twice: the later copy
        assembly.message_ids.append(submit.message_id)
        if any(n not in assembly.parts for n in range(1, total + 1)):
            return None
        del self._assemblies[key]
        if assembly.timer is not None:
            assembly.timer.cancel()
        parts = [assembly.parts[n] for n in range(1, total + 1)]
        return _Message(parts, _join(parts), assembly.message_ids)

    def _dispatch(self, run: _RouteRun, message: _Message) -> None:
        """Decide the message's fate now, by the profile in force, and set it in motion."""
        first = message.first
        phase, profile = run.profile_at(self._elapsed_s(message.complete_at))
        handset = self._handset_for(first.destination_addr)
        record = _truth(run.name, message, "delivered", phase)
        wanted = first.registered_delivery & 0x03
        if handset is None:
            record.fate = "no_handset"
            self._spawn(
                self._report_failure(run, record, message, profile.receipt_delay_ms, "UNDELIV", wanted)
            )
            return
        record.pi, record.modem = handset.info.pi, handset.info.modem
        rng = run.rng
        lost = rng.random() < profile.loss
        record.latency_ms = latency_ms = _draw_latency(rng, profile.latency_ms)
        if lost:
            record.fate = "lost"
            record.fake_receipt = rng.random() < profile.fake_receipt
            stat = "DELIVRD" if record.fake_receipt else profile.lost_receipt
            delay_ms = latency_ms + profile.receipt_delay_ms
            self._spawn(self._report_failure(run, record, message, delay_ms, stat, wanted))
            return
        sender = record.sender_sent
        if _is_alphanumeric(first) and rng.random() < profile.sender_rewrite:
            sender = self._local_number(rng, handset)
        text = _change_text(rng, message.text, profile.content)
        smsc = handset.network.smsc_addresses[0] if profile.smsc == "own" else profile.smsc
        handed_over = message.complete_at + timedelta(milliseconds=latency_ms * profile.handover_share)
        scts = handed_over.replace(microsecond=0)
        self._spawn(self._deliver(run, record, message, handset, sender, text, smsc, scts, profile, wanted))

    def _handset_for(self, destination_addr: str) -> _Handset | None:
        return self._handsets.get(_e164(destination_addr).removeprefix("+"))

    def _local_number(self, rng: random.Random, handset: _Handset) -> str:
        """A mobile number of the handset's country, as long as the handset's, as a SIM box sends from."""
        country = handset.network.country
        networks = [n for n in self.scenario.networks if n.country == country]
        prefix = rng.choice(rng.choice(networks).number_ranges)
        digits = max(len(handset.info.msisdn) - len(prefix), 4)
        return prefix + "".join(rng.choice("0123456789") for _ in range(digits))

    # -- the message's journey -----------------------------------------------------------------------

    async def _deliver(
        self,
        run: _RouteRun,
        record: TruthRecord,
        message: _Message,
        handset: _Handset,
        sender: str,
        text: str,
        smsc: str,
        scts: datetime,
        profile: RouteProfile,
        wanted: int,
    ) -> None:
        """After the latency, hand the message to the handset; then its receipt."""
        try:
            await _sleep_until(message.complete_at, record.latency_ms or 0.0)
        except asyncio.CancelledError:
            record.fate = "stopped"
            self._record(record)
            raise
        job = asyncio.create_task(self._hand_over(handset, sender, text, smsc, scts))
        try:
            outcome = await asyncio.shield(job)
        except asyncio.CancelledError:  # stopping: the handset still gets it, the truth says so
            outcome = await job
            self._delivered(run, record, handset, outcome, sender, text, smsc, scts)
            self._record(record)
            raise
        self._delivered(run, record, handset, outcome, sender, text, smsc, scts)
        if record.fate == "delivered":
            stat = "DELIVRD" if wanted == 1 else None
        else:
            stat = profile.lost_receipt if wanted in (1, 2) else None
        try:
            if stat is not None:
                await asyncio.sleep(profile.receipt_delay_ms / 1000)
                await self._receipt(run, record, message, stat)
        finally:
            self._record(record)

    async def _hand_over(
        self, handset: _Handset, sender: str, text: str, smsc: str, scts: datetime
    ) -> Delivery | Exception:
        """``deliver()`` on the modem, in a thread (it writes to a pty), one at a time per modem."""
        modem = handset.modem
        assert modem is not None
        async with handset.lock:
            try:
                return await asyncio.to_thread(modem.deliver, sender, text, smsc=smsc, scts=scts)
            except Exception as exc:  # StorageFullError, or a text the PDU encoder refuses
                return exc

    def _delivered(
        self,
        run: _RouteRun,
        record: TruthRecord,
        handset: _Handset,
        outcome: Delivery | Exception,
        sender: str,
        text: str,
        smsc: str,
        scts: datetime,
    ) -> None:
        extra = {
            "route": run.name,
            "agent": handset.info.pi,
            "modem": handset.info.modem,
            "message_id": record.message_id,
        }
        if isinstance(outcome, StorageFullError):
            record.fate, record.error = "storage_full", str(outcome)
            log.info("%s: %s not delivered: %s", run.name, record.message_id, outcome, extra=extra)
            return
        if isinstance(outcome, Exception):
            record.fate, record.error = "lost", f"delivery failed: {outcome!r}"
            log.error("%s: delivering %s failed: %r", run.name, record.message_id, outcome, extra=extra)
            return
        record.fate = "delivered"
        record.delivered_at = outcome.urc_at
        record.sender_delivered, record.text_delivered = sender, text
        record.smsc_address, record.scts = smsc, scts
        log.info(
            "%s: %s delivered to %s after %.0f ms",
            run.name,
            record.message_id,
            handset.info.msisdn,
            record.latency_ms or 0.0,
            extra=extra,
        )

    async def _report_failure(
        self, run: _RouteRun, record: TruthRecord, message: _Message, delay_ms: float, stat: str, wanted: int
    ) -> None:
        """A message that never reaches a handset: its receipt (honest or not) after ``delay_ms``."""
        log.info(
            "%s: %s %s%s",
            run.name,
            record.message_id,
            record.fate,
            " (fake receipt)" if record.fake_receipt else "",
            extra={
                "route": run.name,
                "message_id": record.message_id,
                "agent": record.pi,
                "modem": record.modem,
            },
        )
        try:
            if wanted == 1 or (wanted == 2 and stat != "DELIVRD"):
                await _sleep_until(message.complete_at, delay_ms)
                await self._receipt(run, record, message, stat)
        finally:
            self._record(record)

    async def _receipt(self, run: _RouteRun, record: TruthRecord, message: _Message, stat: str) -> None:
        """One receipt per part, as SMSCs send them."""
        assert run.server is not None
        record.receipt_stat, record.receipt_at = stat, datetime.now(UTC)
        for message_id in message.message_ids:
            await run.server.send_receipt(
                message_id, stat=stat, err=ERR_NONE if stat == "DELIVRD" else ERR_FAILED
            )

    async def _expire(self, key: tuple[Any, ...]) -> None:
        await asyncio.sleep(CONCAT_TIMEOUT_S)
        self._give_up(key, f"parts missing after {CONCAT_TIMEOUT_S:.0f} s")

    def _give_up(self, key: tuple[Any, ...], reason: str) -> None:
        """A long message whose parts never all arrived: recorded as incomplete, never delivered."""
        assembly = self._assemblies.pop(key, None)
        if assembly is None:
            return
        run = self._runs[key[0]]
        parts = [assembly.parts[n] for n in sorted(assembly.parts)]
        first = parts[0]
        phase, _ = run.profile_at(self._elapsed_s(max(p.received_at for p in parts)))
        missing = [n for n in range(1, assembly.total + 1) if n not in assembly.parts]
        self._record(
            TruthRecord(
                route=run.name,
                message_id=first.message_id,
                message_ids=list(assembly.message_ids),
                parts=assembly.total,
                system_id=first.system_id,
                destination=_e164(first.destination_addr),
                sender_sent=_sender(first),
                text_sent=_join(parts),
                received_at=first.received_at,
                fate="incomplete",
                profile_phase=phase,
                error=f"{reason}: part(s) {', '.join(map(str, missing))} of {assembly.total} missing",
            )
        )

    def _settle_unhandled(self) -> None:
        """Submits accepted but not yet seen by the hook when the SMSCs stopped: their truth."""
        for run in self._runs.values():
            if run.server is None:
                continue
            for submit in run.server.submits:
                if (run.name, submit.message_id) in self._handled:
                    continue
                self._handled.add((run.name, submit.message_id))
                message = self._collect(run, submit)
                if message is None:
                    continue
                phase, _ = run.profile_at(self._elapsed_s(message.complete_at))
                self._record(_truth(run.name, message, "stopped", phase))

    async def _follow_phases(self, run: _RouteRun) -> None:
        """At each change: the SMSC's throughput limit follows the profile, and a log line says so."""
        assert run.server is not None
        for index, (moment, profile) in enumerate(run.phases[1:], start=1):
            delay_s = moment - (time.monotonic() - self._started_mono)
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            run.server.behaviour.max_submits_per_s = profile.max_submits_per_s
            log.info(
                "%s: profile phase %d in force (%.1f s after the start)",
                run.name,
                index,
                moment,
                extra={"route": run.name},
            )

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _record(self, record: TruthRecord) -> None:
        """Keep the record and append it to ``truth.jsonl`` (one short line, flushed)."""
        self.truth.append(record)
        if self._truth_file is not None:
            self._truth_file.write(json.dumps(record.to_json()) + "\n")
            self._truth_file.flush()


# --------------------------------------------------------------------------- what a route does


async def _sleep_until(start: datetime, delay_ms: float) -> None:
    """Sleep until ``delay_ms`` after the wall-clock moment ``start``."""
    remaining_s = delay_ms / 1000 - (datetime.now(UTC) - start).total_seconds()
    if remaining_s > 0:
        await asyncio.sleep(remaining_s)


def _draw_latency(rng: random.Random, latency: Latency) -> float:
    """A lognormal draw around the median, clamped to [min, max] (max winning)."""
    value = rng.lognormvariate(math.log(latency.median), latency.sigma) if latency.sigma else latency.median
    value = max(value, latency.min)
    if latency.max is not None:
        value = min(value, latency.max)
    return value


def _change_text(rng: random.Random, text: str, content: ContentChanges) -> str:
    """The text as the route delivers it."""
    if content.strip_unicode and rng.random() < content.strip_unicode:
        text = _to_gsm7(text)
    if content.replace_code and rng.random() < content.replace_code:
        text = _replace_code(rng, text)
    if content.cut_to is not None:
        text = text[: content.cut_to]
    return text


def _to_gsm7(text: str) -> str:
    """Every character outside GSM 7-bit as its base letter (``ş`` → ``s``), or ``?``."""
    out = []
    for char in text:
        if is_gsm7(char):
            out.append(char)
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        out.append(base if base and is_gsm7(base) else "?")
    return "".join(out)


def _replace_code(rng: random.Random, text: str) -> str:
    """The first one-time code in the text replaced by other digits of the same length."""
    match = _CODE.search(text)
    if match is None:
        return text
    code = match.group()
    other = code
    while other == code:
        other = "".join(rng.choice("0123456789") for _ in code)
    return text[: match.start()] + other + text[match.end() :]


def _truth(route: str, message: _Message, fate: Fate, phase: int) -> TruthRecord:
    """A message's ground-truth record as submitted; the rest is filled in as its fate unfolds."""
    first = message.first
    return TruthRecord(
        route=route,
        message_id=first.message_id,
        message_ids=list(message.message_ids),
        parts=len(message.parts),
        system_id=first.system_id,
        destination=_e164(first.destination_addr),
        sender_sent=_sender(first),
        text_sent=message.text,
        received_at=first.received_at,
        fate=fate,
        profile_phase=phase,
    )


def _e164(address: str) -> str:
    """A destination_addr as E.164 with the ``+`` (an international ``00`` prefix dropped)."""
    digits = address.removeprefix("+")
    if digits.startswith("00"):
        digits = digits[2:]
    return "+" + digits


def _sender(submit: ReceivedSubmit) -> str:
    """The sender as sent: ``+`` and digits for an international number, else as given."""
    address = submit.source_addr
    if submit.source_addr_ton == TON_INTERNATIONAL and address.isdigit():
        return "+" + address
    return address


def _is_alphanumeric(submit: ReceivedSubmit) -> bool:
    return submit.source_addr_ton == TON_ALPHANUMERIC or not submit.source_addr.removeprefix("+").isdigit()


def _body(submit: ReceivedSubmit) -> bytes:
    """A part's payload without its user data header."""
    payload = submit.message_payload if submit.message_payload is not None else submit.short_message
    return payload[len(submit.udh) :] if submit.udh else payload


def _join(parts: list[ReceivedSubmit]) -> str:
    """The text of parts in order; decoded whole when they share a coding (a UCS2 surrogate pair or
    a GSM escape split between parts then comes out right)."""
    codings = {p.data_coding for p in parts}
    if len(codings) == 1:
        return decode_text(b"".join(_body(p) for p in parts), codings.pop())
    return "".join(p.text for p in parts)


__all__ = ["Fate", "HandsetInfo", "RouteEndpoint", "SimNetwork", "TruthRecord"]
