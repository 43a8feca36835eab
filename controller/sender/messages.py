"""The sender's journal: every message it took, its routing decision, its parts and receipts.

A message row is written before anything is sent (so an idempotency key is claimed once, and a
crash leaves a trace), then completed with the route's part ids or the reason nothing took it.
Receipts are stored by (route, message id) in ``receipts`` (where test results judge them, see
``controller.results``) and summarised on the message: delivered once every part is, or
undeliverable at the first final failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.results import Outcome, rejudge_receipts, text_column
from controller.sender.receipts import DeliveryReceipt
from controller.storage import schema as s
from controller.storage.db import dialect_insert

#: Receipt states after which nothing more will happen to the part.
FINAL_FAILURES = frozenset({"UNDELIV", "EXPIRED", "DELETED", "REJECTD", "UNKNOWN"})


class IdempotencyConflict(ValueError):
    """The key was used before for a different message."""


async def create(conn: AsyncConnection, values: dict[str, Any]) -> tuple[int, bool]:
    """Write a new message row; returns (id, created). With an idempotency key already used for
    the same message, (that message's id, False); for a different one, ``IdempotencyConflict``."""
    key = values.get("idempotency_key")
    if key is not None:
        existing = await _by_key(conn, key)
        if existing is not None:
            return _same_or_conflict(existing, values), False
    try:
        async with conn.begin_nested():
            new_id = (
                await conn.execute(s.messages.insert().values(**values).returning(s.messages.c.id))
            ).scalar_one()
    except IntegrityError:
        existing = await _by_key(conn, key) if key is not None else None
        if existing is None:
            raise
        return _same_or_conflict(existing, values), False
    return int(new_id), True


async def _by_key(conn: AsyncConnection, key: str) -> Any:
    return (await conn.execute(select(s.messages).where(s.messages.c.idempotency_key == key))).one_or_none()


def _same_or_conflict(existing: Any, values: dict[str, Any]) -> int:
    for name in ("destination", "sender", "text"):
        if getattr(existing, name) != values.get(name):
            raise IdempotencyConflict(
                f"idempotency key {values['idempotency_key']!r} was used for message {existing.id} "
                f"with another {name}"
            )
    return int(existing.id)


async def record_submit(
    conn: AsyncConnection,
    message: int,
    *,
    route: str,
    decision: dict[str, Any],
    message_ids: Sequence[str],
    submitted_at: datetime,
    acked_at: datetime,
) -> None:
    """The route took every part: store the part ids, then apply receipts that came first."""
    await conn.execute(
        update(s.messages)
        .where(s.messages.c.id == message)
        .values(
            route=route,
            decision=decision,
            status="submitted",
            parts=len(message_ids),
            message_ids=list(message_ids),
            submitted_at=submitted_at,
            acked_at=acked_at,
            error=None,
        )
    )
    await conn.execute(
        dialect_insert(conn)(s.message_parts).on_conflict_do_nothing(),
        [
            {"route": route, "message_id": mid, "message": message, "part": i}
            for i, mid in enumerate(message_ids, start=1)
        ],
    )
    await _summarise(conn, message)


async def record_failure(
    conn: AsyncConnection, message: int, *, decision: dict[str, Any], error: str
) -> None:
    """No route took the message."""
    await conn.execute(
        update(s.messages)
        .where(s.messages.c.id == message)
        .values(status="failed", decision=decision, error=error, route=None)
    )


async def apply_receipt(
    conn: AsyncConnection, route: str, receipt: DeliveryReceipt, *, received_at: datetime
) -> tuple[int | None, Outcome]:
    """Store a receipt of ``route``; returns the message it belongs to (None when unknown: kept
    all the same, its submit may not be written yet) and the test results re-judged."""
    forms = (receipt.message_id, *receipt.message_id_alternatives)
    part = (
        await conn.execute(
            select(s.message_parts.c.message_id, s.message_parts.c.message).where(
                and_(s.message_parts.c.route == route, s.message_parts.c.message_id.in_(forms))
            )
        )
    ).first()
    message_id = part.message_id if part is not None else receipt.message_id
    raw = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(receipt).items()}
    raw["network_error_code"] = receipt.network_error_code.hex() if receipt.network_error_code else None
    await conn.execute(
        s.receipts.insert().values(
            route=route,
            message_id=message_id,
            status=receipt.stat,
            error=text_column(receipt.err[:16]) if receipt.err else None,
            done_at=receipt.done_date,
            received_at=received_at,
            raw=raw,
        )
    )
    outcome = await rejudge_receipts(conn, route, [message_id])
    if part is None:
        return None, outcome
    await _summarise(conn, int(part.message))
    return int(part.message), outcome


async def _summarise(conn: AsyncConnection, message: int) -> None:
    """The message's receipt status from its parts' latest receipts."""
    parts = list(
        await conn.execute(
            select(s.message_parts.c.route, s.message_parts.c.message_id).where(
                s.message_parts.c.message == message
            )
        )
    )
    if not parts:
        return
    route = parts[0].route
    rows = list(
        await conn.execute(
            select(s.receipts.c.message_id, s.receipts.c.status, s.receipts.c.received_at)
            .where(
                and_(s.receipts.c.route == route, s.receipts.c.message_id.in_([p.message_id for p in parts]))
            )
            .order_by(s.receipts.c.received_at, s.receipts.c.id)
        )
    )
    if not rows:
        return
    latest = {r.message_id: r for r in rows}
    states = {r.status for r in latest.values()}
    if states & FINAL_FAILURES:
        status = "undeliverable"
    elif len(latest) == len(parts) and states == {"DELIVRD"}:
        status = "delivered"
    else:
        status = "submitted"
    newest = rows[-1]
    await conn.execute(
        update(s.messages)
        .where(s.messages.c.id == message)
        .values(status=status, receipt_status=newest.status, receipt_at=newest.received_at)
    )


async def get(conn: AsyncConnection, message: int) -> dict[str, Any] | None:
    """A message with its receipts (every part's), or None."""
    row = (await conn.execute(select(s.messages).where(s.messages.c.id == message))).one_or_none()
    if row is None:
        return None
    found = dict(row._mapping)
    found["receipts"] = []
    if row.route and row.message_ids:
        receipts = await conn.execute(
            select(s.receipts)
            .where(and_(s.receipts.c.route == row.route, s.receipts.c.message_id.in_(list(row.message_ids))))
            .order_by(s.receipts.c.received_at, s.receipts.c.id)
        )
        found["receipts"] = [
            {
                "message_id": r.message_id,
                "status": r.status,
                "error": r.error,
                "done_at": r.done_at,
                "received_at": r.received_at,
            }
            for r in receipts
        ]
    return found


__all__ = [
    "FINAL_FAILURES",
    "IdempotencyConflict",
    "apply_receipt",
    "create",
    "get",
    "record_failure",
    "record_submit",
]
