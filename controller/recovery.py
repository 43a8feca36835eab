"""Tests left in ``submitting`` by a controller instance that stopped: they may have gone out, so
they become ``failed`` with an unknown outcome (their price stays counted), but only once the
instance that claimed them is gone (``controller.instances``), never while it is submitting them."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import and_, case, literal, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from controller.instances import Heartbeat, gone, prune
from controller.storage import schema as s
from probe_agent.logs import bind

log = logging.getLogger(__name__)

#: The error of a test whose submit was cut short by a stop (the claim names no instance).
STOPPED_ERROR = "the controller stopped during the submit: outcome unknown"


async def recover_orphaned(
    engine: AsyncEngine, heartbeat: Heartbeat, now: datetime | None = None
) -> list[int]:
    """The leader's pass (in its deadline sweep): fail, outcome unknown, the tests in ``submitting``
    claimed by another instance that is gone (its heartbeat expired more than the allowed clock
    skew ago, or removed); prune the heartbeats of instances long dead. The ids it failed."""
    now = now or datetime.now(UTC)
    if now.utcoffset() is None:
        raise ValueError(f"naive datetime {now.isoformat()}: give it a time zone (UTC)")
    now = now.astimezone(UTC)
    tc = s.test_cases
    where = and_(
        tc.c.claimed_by != heartbeat.instance, gone(tc.c.claimed_by, now, heartbeat.max_clock_skew_s)
    )
    failed = await fail_submitting(
        engine, where, f"its instance is gone, found by the leader {heartbeat.instance}"
    )
    async with engine.begin() as conn:
        pruned = await prune(conn, now)
    if pruned:
        log.info("pruned the heartbeats of %d controller instances that stopped long ago", pruned)
    return failed


async def fail_submitting(engine: AsyncEngine, where: ColumnElement[bool] | None, why: str) -> list[int]:
    """Mark failed, outcome unknown, the tests in ``submitting`` that match ``where`` (all without
    it), each logged with the instance that claimed it; their ids."""
    tc = s.test_cases
    condition = tc.c.status == "submitting" if where is None else and_(tc.c.status == "submitting", where)
    error = case(
        (tc.c.claimed_by.is_(None), literal(STOPPED_ERROR)),
        else_=literal("controller instance ")
        + tc.c.claimed_by
        + literal(" stopped during the submit: outcome unknown"),
    )
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                update(tc)
                .where(condition)
                .values(status="failed", error=error)
                .returning(
                    tc.c.id, tc.c.campaign_id, tc.c.route, tc.c.imsi, tc.c.claimed_by, tc.c.submitted_at
                )
            )
        ).all()
    for row in sorted(rows, key=lambda r: r.id):
        bind(log, route=row.route, test_id=row.id, instance=row.claimed_by).warning(
            "campaign %s: test to probe %s, claimed for submit at %s by instance %s, failed (%s): "
            "outcome unknown, its price stays counted",
            row.campaign_id,
            row.imsi,
            row.submitted_at.isoformat() if row.submitted_at else "an unknown time",
            row.claimed_by or "unknown (claimed before claims named their instance)",
            why,
        )
    return sorted(row.id for row in rows)
