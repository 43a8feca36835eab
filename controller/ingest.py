"""Ingest: every message from the agents validated against the wire contract and written in
batches; an invalid one goes to the dead-letter table with its error and topic (counted per
agent), never a crash; a duplicate observation (same id, at-least-once delivery) is dropped.
Each new observation is matched to its test case and its result written in the same
transaction (``controller.results``); ``sweep`` decides the tests whose deadline passed.

Agent availability follows the retained status and the last will, by session: a ``lost`` will
of an old session never overrides a newer ``online``. Probe state follows the modems' retained
state; a SIM seen in another modem, or a modem holding another SIM, is recorded as an event,
and so is a change of registration or connection. Each change of signal, registration or
connection is also kept as a probe sample (the probe page's signal history): always for
registration and connection, at most every ``SAMPLE_EVERY`` for the signal alone, so a modem
whose signal wobbles on every report writes a few rows an hour, not thousands; a probe's samples
older than ``SAMPLES_KEPT`` are deleted when it gets a new one.
Each message is acknowledged to the broker only after its transaction committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.correlation import DEFAULT_GRACE_MS
from controller.results import match_new_observations, sweep_deadlines, text_column
from controller.storage import schema as s
from controller.storage.db import RawJson, dialect_insert
from probe_agent.protocol import (
    AgentStatus,
    CommandResponse,
    Health,
    InvalidPayload,
    ModemState,
    Observation,
    Payload,
    Topic,
    Topics,
    decode,
)

log = logging.getLogger(__name__)

Ack = Callable[[], None]

#: Full batches that may wait for the database while the next one is received.
MAX_WRITES_AHEAD = 2
#: A probe's signal alone is sampled at most this often (registration and connection changes
#: always are): agents report the modem state on every change, and signal wobbles.
SAMPLE_EVERY = timedelta(minutes=5)
#: A probe's samples older than this are deleted when it gets a new one (through the (imsi, at)
#: index: a handful of rows each time, never a scan of the table).
SAMPLES_KEPT = timedelta(days=30)


#: Topics whose parse is remembered (agents x their few topics); past it, the memory starts over.
TOPICS_REMEMBERED = 10_000


class _RememberedTopics(Topics):
    """The contract's topics, each parsed once: ingest sees the same few topics of each agent all
    day, and trying the contract's patterns in turn was a visible share of a message's cost."""

    def __init__(self, topics: Topics) -> None:
        super().__init__(topics.prefix)
        self._known: dict[str, Topic | None] = {}

    def parse(self, topic: str) -> Topic | None:
        try:
            return self._known[topic]
        except KeyError:
            pass
        parsed = super().parse(topic)
        if len(self._known) >= TOPICS_REMEMBERED:
            self._known.clear()
        self._known[topic] = parsed
        return parsed


@dataclass
class IngestStats:
    """Counters since start, for health and tests."""

    stored: int = 0
    duplicates: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    matched: int = 0
    unsolicited: int = 0
    undelivered: int = 0


@dataclass
class _Entry:
    """One message waiting for the batch write, with what a dead letter of it needs."""

    kind: str
    message: Any
    received_at: datetime
    topic: str
    payload: bytes
    acks: list[Ack]


@dataclass
class _Pending:
    entries: list[_Entry] = field(default_factory=list)
    observations: dict[str, _Entry] = field(default_factory=dict)
    duplicates_in_batch: int = 0

    def acks(self) -> list[Ack]:
        return [ack for entry in self.entries for ack in entry.acks]


#: Errors of the database itself (down, locked, connection lost): the batch stays
#: unacknowledged for the broker to resend. Any other error is blamed on the data.
_ENVIRONMENT_ERRORS = (OperationalError, InterfaceError, OSError, TimeoutError)


class Ingest:
    """Validates, batches and writes what the agents publish."""

    def __init__(
        self,
        engine: AsyncEngine,
        topics: Topics,
        *,
        batch_max: int = 500,
        flush_interval_s: float = 0.05,
        on_response: Callable[[str, str, CommandResponse, datetime], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        grace_ms: float = DEFAULT_GRACE_MS,
    ) -> None:
        self.engine = engine
        self.topics = topics
        self._topics = _RememberedTopics(topics)
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.on_response = on_response
        #: How long past a deadline an SMS without its token may still be matched to its test.
        self.grace_ms = grace_ms
        #: Called when a background write fails: its messages are unacknowledged, the broker must resend.
        self.on_failure = on_failure
        self.stats = IngestStats()
        self._pending = _Pending()
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._behind: deque[asyncio.Task[None]] = deque()
        self._insert = dialect_insert(engine)

    async def handle(self, topic: str, payload: bytes, received_at: datetime, ack: Ack) -> None:
        """Take one MQTT message; ``ack`` is called once it is durably handled."""
        try:
            parsed, message = decode(self._topics, topic, payload)
            claimed = getattr(message, "agent", None)
            if parsed.agent is not None and claimed is not None and claimed != parsed.agent:
                # The broker's ACL vouches for the topic, not for the payload: an agent may only
                # speak for itself.
                raise InvalidPayload(
                    topic, f"agent {claimed!r} in a payload on agent {parsed.agent!r}'s topic"
                )
        except InvalidPayload as exc:
            where = self._topics.parse(topic)
            agent = where.agent if where else None
            self.stats.invalid[agent or "?"] += 1
            log.warning("invalid payload on %s: %s", topic, exc.reason, extra={"agent": agent})
            self._pending.entries.append(
                _Entry("dead", (agent, exc.reason), received_at, topic, payload, [ack])
            )
        else:
            if isinstance(message, CommandResponse):
                if self.on_response is not None and parsed.agent and parsed.command:
                    self.on_response(parsed.agent, parsed.command, message, received_at)
                ack()
                return
            if isinstance(message, Observation) and message.id in self._pending.observations:
                self._pending.duplicates_in_batch += 1
                self._pending.observations[message.id].acks.append(ack)
            else:
                entry = _Entry(parsed.kind, message, received_at, topic, payload, [ack])
                self._pending.entries.append(entry)
                if isinstance(message, Observation):
                    self._pending.observations[message.id] = entry
        if len(self._pending.entries) >= self.batch_max:
            await self._flush_behind()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_interval_s, self._flush_soon)

    async def _flush_behind(self) -> None:
        """Write the full batch while the next one is received: the receive loop waits only
        when ``MAX_WRITES_AHEAD`` batches are already waiting for the database."""
        self._behind.append(self._write_in_background(self._take()))
        while len(self._behind) > MAX_WRITES_AHEAD:
            await asyncio.wait({self._behind.popleft()})

    def _take(self) -> _Pending:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, _Pending()
        return pending

    def _flush_soon(self) -> None:
        self._timer = None
        self._write_in_background(self._take())

    def _write_in_background(self, pending: _Pending) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._write_batch(pending, background=True))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        return task

    async def flush(self) -> None:
        """Write what is pending in one transaction, then acknowledge it."""
        await self._write_batch(self._take(), background=False)

    async def _write_batch(self, pending: _Pending, *, background: bool) -> None:
        """Batches are written one at a time, in the order taken (the lock is fair). When a batch
        fails for its data (not the database's state), each message is written on its own and the
        one that fails goes to the dead letters, so one poison message cannot block the rest. A
        batch written in the background (timed, or behind the receive loop) that fails for the
        database's state stays unacknowledged and ``on_failure`` is told, for the broker to resend
        it; ``flush()`` raises instead."""
        async with self._lock:
            if not pending.entries:
                return
            if not background:
                await self._write_checked(pending)
                return
            try:
                await self._write_checked(pending)
            except Exception:
                log.exception("writing a batch failed; its messages stay unacknowledged")
                if self.on_failure is not None:
                    self.on_failure()

    async def _write_checked(self, pending: _Pending) -> None:
        try:
            await self._write(pending)
        except _ENVIRONMENT_ERRORS:
            raise
        except Exception as exc:
            if len(pending.entries) == 1:
                await self._poisoned(pending.entries[0], exc)
                return
            log.warning(
                "a batch of %d messages failed (%s: %s); writing them one at a time",
                len(pending.entries),
                type(exc).__name__,
                exc,
            )
            await self._write_each(pending)
            return
        for ack in pending.acks():
            ack()

    async def _write(self, pending: _Pending) -> None:
        async with self.engine.begin() as conn:
            stored = await self._write_observations(conn, pending)
            for entry in pending.entries:
                if not isinstance(entry.message, Observation):
                    await self._apply(conn, entry)
        self.stats.stored += stored
        self.stats.duplicates += len(pending.observations) - stored + pending.duplicates_in_batch
        self.stats.batches += 1

    async def _write_each(self, pending: _Pending) -> None:
        """Each message in its own transaction, in the order received, acknowledged as it goes;
        one that still fails is dead-lettered. A database error stops it: the rest stay
        unacknowledged."""
        self.stats.duplicates += pending.duplicates_in_batch
        for entry in pending.entries:
            single = _Pending(entries=[entry])
            if isinstance(entry.message, Observation):
                single.observations[entry.message.id] = entry
            try:
                await self._write(single)
            except _ENVIRONMENT_ERRORS:
                raise
            except Exception as exc:
                await self._poisoned(entry, exc)
                continue
            for ack in entry.acks:
                ack()

    async def _poisoned(self, entry: _Entry, exc: Exception) -> None:
        """A valid message the database would not take: kept as a dead letter, then acknowledged
        (resending it would fail the same way, for ever)."""
        where = self._topics.parse(entry.topic)
        agent = where.agent if where else None
        reason = f"could not be stored: {type(exc).__name__}: {exc}"[:2000]
        log.error("message on %s %s", entry.topic, reason, extra={"agent": agent})
        self.stats.invalid[agent or "?"] += 1
        dead = _Entry("dead", (agent, reason), entry.received_at, entry.topic, entry.payload, entry.acks)
        async with self.engine.begin() as conn:
            await self._apply(conn, dead)
        for ack in entry.acks:
            ack()

    async def close(self) -> None:
        """Write what is pending (on a clean stop)."""
        await self.flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    async def _write_observations(self, conn: AsyncConnection, pending: _Pending) -> int:
        if not pending.observations:
            return 0
        ids = list(pending.observations)
        seen = set(
            (await conn.execute(select(s.observations.c.id).where(s.observations.c.id.in_(ids)))).scalars()
        )
        new = [entry.message for obs_id, entry in pending.observations.items() if obs_id not in seen]
        if not new:
            return 0
        now = max(entry.received_at for entry in pending.observations.values())
        outcome, marks = await match_new_observations(conn, new, now=now, grace_ms=self.grace_ms)
        self.stats.matched += outcome.token + outcome.fuzzy
        self.stats.unsolicited += outcome.unsolicited
        rows = [
            {
                "id": obs.id,
                "agent_id": obs.agent,
                "modem_id": obs.modem,
                "imsi": obs.sim.imsi,
                "sender": text_column(obs.sender),
                "text": text_column(obs.text),
                "smsc": text_column(obs.smsc),
                "urc_at": obs.urc_at,
                "ingested_at": pending.observations[obs.id].received_at,
                "test_case_id": marks[obs.id][0],
                "match": marks[obs.id][1],
                # Stored as the agent sent it (validated above), not re-encoded.
                "payload": RawJson(pending.observations[obs.id].payload.decode()),
            }
            for obs in new
        ]
        # Another controller instance (shared subscription) may have written one meanwhile.
        result = await conn.execute(self._insert(s.observations).on_conflict_do_nothing(), rows)
        stored = result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(rows)
        return int(stored)

    async def sweep(self, now: datetime) -> int:
        """Decide the test cases whose deadline passed with nothing received; how many."""
        async with self._lock, self.engine.begin() as conn:
            outcome = await sweep_deadlines(conn, now=now)
        self.stats.undelivered += outcome.undelivered
        return outcome.undelivered

    async def _apply(self, conn: AsyncConnection, entry: _Entry) -> None:
        kind, message, received_at = entry.kind, entry.message, entry.received_at
        if kind == "dead":
            agent, error = message
            await conn.execute(
                s.dead_letters.insert().values(
                    received_at=received_at,
                    agent_id=agent,
                    topic=entry.topic,
                    error=error,
                    payload=entry.payload,
                )
            )
            if agent:
                await self._ensure_agent(conn, agent, received_at)
                await conn.execute(
                    update(s.agents)
                    .where(s.agents.c.id == agent)
                    .values(invalid_payloads=s.agents.c.invalid_payloads + 1)
                )
        elif kind == "status":
            await self._apply_status(conn, message, received_at)
        elif kind == "modem_state":
            await self._apply_modem_state(conn, message, received_at)
        elif kind == "health":
            await self._apply_health(conn, message, received_at)

    async def _ensure_agent(self, conn: AsyncConnection, agent: str, at: datetime) -> None:
        await conn.execute(
            self._insert(s.agents)
            .values(id=agent, state="unknown", status_at=at, last_seen_at=at, dropped=0, invalid_payloads=0)
            .on_conflict_do_nothing()
        )

    async def _apply_status(self, conn: AsyncConnection, status: AgentStatus, at: datetime) -> None:
        await self._ensure_agent(conn, status.agent, at)
        row = (await conn.execute(select(s.agents).where(s.agents.c.id == status.agent))).one()
        if status.state != "online" and row.session not in (None, status.session) and row.state == "online":
            started = row.started_at
            if started is not None and started.tzinfo is None:
                started = started.replace(tzinfo=UTC)
            if started is None or started >= status.started_at:
                # The will (or a late offline) of an older process: the live one stays online.
                log.info(
                    "ignoring %s of old session %s for %s",
                    status.state,
                    status.session,
                    status.agent,
                    extra={"agent": status.agent},
                )
                return
        await conn.execute(
            update(s.agents)
            .where(s.agents.c.id == status.agent)
            .values(
                state=status.state,
                session=status.session,
                version=status.version,
                started_at=status.started_at,
                status_at=at,
                last_seen_at=at,
                dropped=status.dropped,
            )
        )

    async def _apply_health(self, conn: AsyncConnection, health: Health, at: datetime) -> None:
        await self._ensure_agent(conn, health.agent, at)
        await conn.execute(
            update(s.agents)
            .where(s.agents.c.id == health.agent)
            .values(health=health.model_dump(mode="json"), last_seen_at=at, dropped=health.dropped)
        )

    async def _apply_modem_state(self, conn: AsyncConnection, state: ModemState, at: datetime) -> None:
        await self._ensure_agent(conn, state.agent, at)
        document = state.model_dump(mode="json")
        if not state.imsi:  # modem down or SIM unreadable: whatever SIM was there is not reachable now
            here = and_(s.probes.c.agent_id == state.agent, s.probes.c.modem_id == state.modem)
            gone = (
                await conn.execute(
                    select(s.probes.c.imsi, s.probes.c.registration).where(here, s.probes.c.connected)
                )
            ).all()
            await conn.execute(
                update(s.probes).where(here).values(connected=False, state=document, updated_at=at)
            )
            for imsi, registration in gone:
                await self._registration_changed(
                    conn, at, state, imsi, (registration, True), (registration, False)
                )
                await self._sample(conn, imsi, at, None, registration, connected=False)
            return
        # The modem held another SIM before: that SIM left it.
        others = (
            await conn.execute(
                select(s.probes.c.imsi).where(
                    and_(
                        s.probes.c.agent_id == state.agent,
                        s.probes.c.modem_id == state.modem,
                        s.probes.c.imsi != state.imsi,
                    )
                )
            )
        ).all()
        for (old_imsi,) in others:
            await self._event(conn, at, "sim_changed", state, {"old_imsi": old_imsi, "new_imsi": state.imsi})
            await conn.execute(
                update(s.probes)
                .where(s.probes.c.imsi == old_imsi)
                .values(agent_id=None, modem_id=None, connected=False)
            )
            await self._sample(conn, old_imsi, at, None, None, connected=False)
        row = (await conn.execute(select(s.probes).where(s.probes.c.imsi == state.imsi))).one_or_none()
        values: dict[str, Any] = {
            "iccid": state.iccid,
            "msisdn": state.msisdn,
            "mcc_mnc": state.mcc_mnc,
            "agent_id": state.agent,
            "modem_id": state.modem,
            "connected": state.connected,
            "registration": state.registration,
            "signal_dbm": state.signal_dbm,
            "state": document,
            "updated_at": at,
        }
        if row is None:
            await conn.execute(s.probes.insert().values(imsi=state.imsi, **values))
        else:
            if row.agent_id is not None and (row.agent_id, row.modem_id) != (state.agent, state.modem):
                await self._event(
                    conn, at, "sim_moved", state, {"from_agent": row.agent_id, "from_modem": row.modem_id}
                )
            await self._registration_changed(
                conn,
                at,
                state,
                state.imsi,
                (row.registration, row.connected),
                (state.registration, state.connected),
            )
            await conn.execute(update(s.probes).where(s.probes.c.imsi == state.imsi).values(**values))
        await self._sample(
            conn, state.imsi, at, state.signal_dbm, state.registration, connected=state.connected
        )

    async def _registration_changed(
        self,
        conn: AsyncConnection,
        at: datetime,
        state: ModemState,
        imsi: str,
        before: tuple[str | None, bool],
        after: tuple[str | None, bool],
    ) -> None:
        """A ``registration`` event when the probe's registration or connection changed; its
        detail names what changed, ``{"registration": {"from": ..., "to": ...}, "connected": ...}``."""
        detail = {
            name: {"from": old, "to": new}
            for name, old, new in zip(("registration", "connected"), before, after, strict=True)
            if old != new
        }
        if detail:
            await self._event(conn, at, "registration", state, detail, imsi=imsi, level=logging.INFO)

    async def _sample(
        self,
        conn: AsyncConnection,
        imsi: str,
        at: datetime,
        signal_dbm: int | None,
        registration: str | None,
        *,
        connected: bool,
    ) -> None:
        """Keep a probe sample when registration or connection changed since the probe's last one,
        or the signal did and that one is ``SAMPLE_EVERY`` old; then drop its expired ones."""
        p = s.probe_samples.c
        last = (
            await conn.execute(
                select(p.at, p.signal_dbm, p.registration, p.connected)
                .where(p.imsi == imsi)
                .order_by(p.at.desc())
                .limit(1)
            )
        ).first()
        if (
            last is not None
            and (last.registration, last.connected) == (registration, connected)
            and (last.signal_dbm == signal_dbm or at - last.at < SAMPLE_EVERY)
        ):
            return
        await conn.execute(
            s.probe_samples.insert().values(
                imsi=imsi, at=at, signal_dbm=signal_dbm, registration=registration, connected=connected
            )
        )
        await conn.execute(delete(s.probe_samples).where(p.imsi == imsi, p.at < at - SAMPLES_KEPT))

    async def _event(
        self,
        conn: AsyncConnection,
        at: datetime,
        kind: str,
        state: ModemState,
        detail: dict[str, Any],
        *,
        imsi: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        """A probe event: of ``imsi``, by default the SIM the state reports."""
        imsi = imsi or state.imsi
        log.log(
            level, "probe %s: %s %s", imsi, kind, detail, extra={"agent": state.agent, "modem": state.modem}
        )
        await conn.execute(
            s.probe_events.insert().values(
                at=at, kind=kind, imsi=imsi, agent_id=state.agent, modem_id=state.modem, detail=detail
            )
        )


__all__ = ["Ingest", "IngestStats", "Payload"]
