"""Results: observations, delivery receipts and deadlines turned into stored test results.

The decisions are ``controller.correlation``'s (pure); this module finds their inputs in the
database and writes what they decide, inside the caller's transaction, so an observation and
its result commit together or not at all:

- ``match_new_observations``: each new observation is matched to its test case (by token, else
  by SIM, time window and sender) and the result written; a late one replaces the deadline's
  "not delivered"; a second delivery of the same test is kept as a duplicate; an SMS that
  matches nothing is kept as unsolicited. A token match for a test case matched before without
  its token (fuzzy) takes its place: the earlier observation is kept, marked ``superseded``. A
  test case whose submit failed (refused, or its outcome unknown) is matched by its token only.
- ``sweep_deadlines``: submitted test cases whose deadline passed with nothing received become
  "not delivered" (their receipts judged: a "delivered" receipt for them is a fake receipt).
- ``rejudge_receipts``: a receipt that comes after the result changes its receipt verdict.

Queries are batched per call (one per kind of input, not one per observation).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from controller.correlation import (
    DEFAULT_GRACE_MS,
    Match,
    Receipt,
    Result,
    TestCase,
    Token,
    arrival_at,
    decide,
    find_tokens,
    judge_receipt,
    match_observation,
)
from controller.storage import schema as s
from controller.storage.db import dialect_insert
from probe_agent.protocol import ClockState, Observation

log = logging.getLogger(__name__)

#: Test-case states that can receive an observation: submitting or submitted (waiting; a fast
#: route can deliver before the submit is acknowledged) or done (a result
#: exists: a late delivery replaces "not delivered", a second one is a duplicate).
OPEN_STATES = ("submitting", "submitted", "done")
#: Columns of ``results`` that ``correlation.Result`` fills.
_RESULT_COLUMNS = frozenset(c.name for c in s.results.columns)


@dataclass
class Outcome:
    """What one call matched and decided, for counters and logs."""

    token: int = 0
    fuzzy: int = 0
    unsolicited: int = 0
    duplicates: int = 0
    late: int = 0
    superseded: int = 0
    undelivered: int = 0
    rejudged: int = 0
    results: list[Result] = field(default_factory=list)


def text_column(value: str | None) -> str | None:
    """``value`` as a text column can hold it: PostgreSQL refuses NUL characters (a UCS-2 SMS
    may carry U+0000), so they become U+FFFD; the payload column keeps the original."""
    return value.replace("\x00", "\ufffd") if value else value


def _case(row: Any) -> TestCase:
    return TestCase(
        id=row.id,
        token=Token.parse(row.token),
        route=row.route,
        mcc_mnc=row.mcc_mnc,
        imsi=row.imsi,
        msisdn=row.msisdn,
        sender=row.sender,
        text=row.text,
        submitted_at=row.submitted_at,
        deadline_at=row.deadline_at,
        submit_error=(row.error or "outcome unknown") if row.status == "failed" else None,
    )


def result_row(result: Result) -> dict[str, Any]:
    """The ``results`` row of a decision."""
    row = {k: v for k, v in asdict(result).items() if k in _RESULT_COLUMNS}
    for name in ("sender_received", "smsc", "content_diff"):
        row[name] = text_column(row[name])
    row["flags"] = list(result.flags)
    row["notes"] = list(result.notes)
    return row


async def _upsert_results(conn: AsyncConnection, results: Sequence[Result]) -> None:
    if not results:
        return
    rows = [result_row(r) for r in results]
    statement = dialect_insert(conn)(s.results)
    updated = {c: statement.excluded[c] for c in rows[0] if c != "test_case_id"}
    await conn.execute(statement.on_conflict_do_update(index_elements=["test_case_id"], set_=updated), rows)
    await conn.execute(
        update(s.test_cases)
        .where(s.test_cases.c.id.in_([r.test_case_id for r in results]))
        .values(status="done")
    )


async def _receipts(conn: AsyncConnection, cases: Iterable[Any]) -> dict[int, list[Receipt]]:
    """Receipts per test case id, found by (route, message id)."""
    keyed = {(c.route, c.message_id): c.id for c in cases if c.message_id}
    if not keyed:
        return {}
    rows = await conn.execute(
        select(s.receipts).where(s.receipts.c.message_id.in_(sorted({m for _, m in keyed})))
    )
    found: dict[int, list[Receipt]] = {}
    for r in rows:
        case_id = keyed.get((r.route, r.message_id))
        if case_id is None:  # the same id issued by another route
            continue
        found.setdefault(case_id, []).append(
            Receipt(status=r.status, received_at=r.received_at, done_at=r.done_at, error=r.error)
        )
    return found


async def _known_smscs(conn: AsyncConnection, networks: Collection[str]) -> dict[str, list[str]]:
    if not networks:
        return {}
    rows = await conn.execute(
        select(s.networks.c.mcc_mnc, s.networks.c.smsc_addresses).where(s.networks.c.mcc_mnc.in_(networks))
    )
    return {r.mcc_mnc: list(r.smsc_addresses or []) for r in rows}


async def _with_measured_clock(conn: AsyncConnection, observations: list[Observation]) -> list[Observation]:
    """Observations whose agent did not know its offset get the one the controller measured."""
    unknown = {o.agent for o in observations if o.clock.offset_ms is None}
    if not unknown:
        return observations
    rows = await conn.execute(
        select(s.agents.c.id, s.agents.c.clock_offset_ms, s.agents.c.clock_error_ms).where(
            and_(s.agents.c.id.in_(unknown), s.agents.c.clock_offset_ms.is_not(None))
        )
    )
    measured = {r.id: (r.clock_offset_ms, r.clock_error_ms) for r in rows}
    out = []
    for o in observations:
        if o.clock.offset_ms is None and o.agent in measured:
            offset, error = measured[o.agent]
            clock = ClockState(offset_ms=offset, error_ms=error, source="controller", since_sync_s=None)
            o = o.model_copy(update={"clock": clock})
        out.append(o)
    return out


async def match_new_observations(
    conn: AsyncConnection,
    observations: Sequence[Observation],
    *,
    now: datetime,
    grace_ms: float = DEFAULT_GRACE_MS,
) -> tuple[Outcome, dict[str, tuple[int | None, str]]]:
    """Match observations not stored before; returns the outcome and, per observation id, the
    test case id (None: unsolicited) and match kind (token, fuzzy, duplicate or none) to store.
    Candidates are test cases carrying a token found in the texts, and those to the same SIMs
    whose deadline plus ``grace_ms`` had not passed at the arrival (a fuzzy match needs both).
    """
    outcome = Outcome()
    marks: dict[str, tuple[int | None, str]] = {}
    if not observations:
        return outcome, marks
    observations = await _with_measured_clock(conn, list(observations))
    tokens = {str(t) for o in observations for t in find_tokens(o.text)}
    arrivals = [arrival_at(o) for o in observations]
    grace = timedelta(milliseconds=grace_ms)
    imsis = {o.sim.imsi for o in observations if o.sim.imsi}
    msisdns = {o.sim.msisdn for o in observations if not o.sim.imsi and o.sim.msisdn}
    clauses: list[ColumnElement[bool]] = []
    if tokens:
        # A failed submit may still have gone out (a timeout, a controller stopped mid-submit):
        # its token proves it did.
        clauses.append(
            and_(s.test_cases.c.token.in_(tokens), s.test_cases.c.status.in_((*OPEN_STATES, "failed")))
        )
    if imsis or msisdns:
        slack = timedelta(minutes=1)
        clauses.append(
            and_(
                s.test_cases.c.status.in_(OPEN_STATES),
                or_(s.test_cases.c.imsi.in_(imsis), s.test_cases.c.msisdn.in_(msisdns)),
                s.test_cases.c.deadline_at >= min(arrivals) - grace,
                s.test_cases.c.submitted_at <= max(arrivals) + slack,
            )
        )
    rows = []
    if clauses:
        rows = list(await conn.execute(select(s.test_cases).where(or_(*clauses))))
    if not rows:
        outcome.unsolicited = len(observations)
        return outcome, {o.id: (None, "none") for o in observations}

    cases = {r.id: r for r in rows}
    candidates = [_case(r) for r in rows]
    delivered_rows = list(
        await conn.execute(
            select(s.results.c.test_case_id, s.results.c.match_kind).where(
                and_(s.results.c.test_case_id.in_(list(cases)), s.results.c.delivered.is_(True))
            )
        )
    )
    delivered = {r.test_case_id for r in delivered_rows}
    # Delivered by a match without the token: a later token match takes their place.
    fuzzy = {r.test_case_id for r in delivered_rows if r.match_kind == "fuzzy"}
    fuzzy_in_batch: dict[int, str] = {}
    superseded_stored: list[int] = []
    receipts = await _receipts(conn, rows)
    smscs = await _known_smscs(conn, {r.mcc_mnc for r in rows})
    decided: dict[int, Result] = {}
    for observation in sorted(observations, key=arrival_at):
        match: Match | None = match_observation(
            observation, candidates, grace_ms=grace_ms, matched=delivered | set(decided), fuzzy_matched=fuzzy
        )
        if match is None:
            outcome.unsolicited += 1
            marks[observation.id] = (None, "none")
            continue
        case = match.case
        if match.duplicate:
            outcome.duplicates += 1
            marks[observation.id] = (case.id, "duplicate")
            log.warning(
                "test case %s delivered twice (observation %s)",
                case.id,
                observation.id,
                extra={"agent": observation.agent, "route": case.route, "test_case": case.id},
            )
            continue
        if match.supersedes:
            fuzzy.discard(case.id)
            earlier = fuzzy_in_batch.pop(case.id, None)
            if earlier is None:
                superseded_stored.append(case.id)
            else:
                marks[earlier] = (case.id, "superseded")
                outcome.fuzzy -= 1
            outcome.superseded += 1
            log.info(
                "test case %s: its token arrived (observation %s); the earlier match without it is set aside",
                case.id,
                observation.id,
                extra={"agent": observation.agent, "route": case.route, "test_case": case.id},
            )
        elif match.kind == "fuzzy":
            fuzzy.add(case.id)
            fuzzy_in_batch[case.id] = observation.id
        result = decide(
            case,
            observation,
            decided_at=now,
            match=match,
            receipts=receipts.get(case.id, ()),
            known_smscs=smscs.get(case.mcc_mnc),
        )
        decided[case.id] = result
        marks[observation.id] = (case.id, match.kind)
        outcome.token += match.kind == "token"
        outcome.fuzzy += match.kind == "fuzzy"
        outcome.late += result.late
        log.info(
            "test case %s delivered by %s in %.0f ms (%s)%s",
            case.id,
            case.route,
            result.latency_ms or 0.0,
            match.kind,
            f"; {', '.join(result.flags)}" if result.flags else "",
            extra={"agent": observation.agent, "route": case.route, "test_case": case.id},
        )
    outcome.results = list(decided.values())
    await _upsert_results(conn, outcome.results)
    if superseded_stored:
        await conn.execute(
            update(s.observations)
            .where(
                and_(s.observations.c.test_case_id.in_(superseded_stored), s.observations.c.match == "fuzzy")
            )
            .values(match="superseded")
        )
    return outcome, marks


async def sweep_deadlines(conn: AsyncConnection, *, now: datetime, limit: int = 5_000) -> Outcome:
    """Submitted test cases past their deadline with nothing received: not delivered."""
    outcome = Outcome()
    rows = list(
        await conn.execute(
            select(s.test_cases)
            .where(and_(s.test_cases.c.status == "submitted", s.test_cases.c.deadline_at <= now))
            .order_by(s.test_cases.c.deadline_at)
            .limit(limit)
        )
    )
    if not rows:
        return outcome
    # Claim them first: a controller that matched one of them meanwhile made it done, and its
    # delivery must not be overwritten with "not delivered".
    claimed = set(
        (
            await conn.execute(
                update(s.test_cases)
                .where(
                    and_(s.test_cases.c.id.in_([r.id for r in rows]), s.test_cases.c.status == "submitted")
                )
                .values(status="done")
                .returning(s.test_cases.c.id)
            )
        ).scalars()
    )
    rows = [r for r in rows if r.id in claimed]
    receipts = await _receipts(conn, rows)
    for row in rows:
        result = decide(_case(row), None, decided_at=now, receipts=receipts.get(row.id, ()))
        outcome.results.append(result)
        log.info(
            "test case %s not delivered by %s by its deadline%s",
            row.id,
            row.route,
            f"; {', '.join(result.flags)}" if result.flags else "",
            extra={"route": row.route, "test_case": row.id},
        )
    outcome.undelivered = len(rows)
    if outcome.results:
        statement = dialect_insert(conn)(s.results).on_conflict_do_nothing(index_elements=["test_case_id"])
        await conn.execute(statement, [result_row(r) for r in outcome.results])
    return outcome


async def rejudge_receipts(conn: AsyncConnection, route: str, message_ids: Collection[str]) -> Outcome:
    """After receipts arrived for ``message_ids`` of ``route``: judge them against the results
    already decided (results not yet decided judge their receipts when they are)."""
    outcome = Outcome()
    if not message_ids:
        return outcome
    rows = list(
        await conn.execute(
            select(s.test_cases, s.results.c.delivered, s.results.c.flags)
            .join(s.results, s.results.c.test_case_id == s.test_cases.c.id)
            .where(and_(s.test_cases.c.route == route, s.test_cases.c.message_id.in_(list(message_ids))))
        )
    )
    receipts = await _receipts(conn, rows)
    for row in rows:
        verdict = judge_receipt(receipts.get(row.id, ()), delivered=bool(row.delivered))
        flags = [f for f in (row.flags or []) if f not in ("fake_receipt", "wrong_receipt")]
        if verdict.flag:
            flags.append(verdict.flag)
        await conn.execute(
            update(s.results)
            .where(s.results.c.test_case_id == row.id)
            .values(receipt_status=verdict.status, receipt_honest=verdict.honest, flags=flags)
        )
        outcome.rejudged += 1
        if verdict.flag:
            log.warning(
                "test case %s: %s (%s)",
                row.id,
                verdict.flag,
                verdict.status,
                extra={"route": route, "test_case": row.id},
            )
    return outcome


__all__ = [
    "OPEN_STATES",
    "Outcome",
    "match_new_observations",
    "rejudge_receipts",
    "result_row",
    "sweep_deadlines",
]
