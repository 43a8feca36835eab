"""Live updates for open pages, as server-sent events on ``GET /events``: new results and agent
status changes appear without a reload.

One poller per process reads what changed since its last look (results by ``decided_at``, agents
by ``status_at`` and ``last_seen_at``) every ``live_poll_interval_s`` while anyone listens, and
fans it out to every open stream. The database is the source, not this process's ingest, so a
page sees results that another controller instance wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import UiConfig
from controller.storage import schema as s
from controller.web.guard import SECURITY_HEADERS, require

log = logging.getLogger(__name__)

#: Events a slow browser may fall behind by before its stream is closed (it reconnects).
QUEUE_EVENTS = 1000
#: A comment line this often keeps proxies from closing an idle stream, seconds.
HEARTBEAT_S = 15.0
#: Most results sent from one look (a burst beyond that is summarised by the next page load).
MAX_RESULTS_PER_LOOK = 200

Event = tuple[str, dict[str, Any]]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class LiveFeed:
    """The poller and its listeners."""

    engine: AsyncEngine
    interval_s: float
    listeners: set[asyncio.Queue[Event | None]] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None
    _results_after: datetime | None = None
    _seen_at_edge: set[int] = field(default_factory=set)
    _agents: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        """A queue that gets every event from now on; the poller starts with the first one."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_EVENTS)
        self.listeners.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ui live feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        """Stop sending to ``queue``."""
        self.listeners.discard(queue)

    async def close(self) -> None:
        """End every stream and the poller (the app is shutting down)."""
        for queue in list(self.listeners):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self.listeners.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _send(self, event: Event) -> None:
        for queue in list(self.listeners):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stalled browser: close its stream, it reconnects
                self.listeners.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    async def _run(self) -> None:
        first = True
        while self.listeners:
            try:
                await self.look(announce=not first)
                first = False
            except Exception:  # the database may be down for a while: keep trying
                log.warning("live feed: reading changes failed; retrying", exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def look(self, announce: bool = True) -> None:
        """Read what changed since the last look and send it (``announce=False``: only note
        where things stand, so a fresh page is not flooded with the past)."""
        r, t, a = s.results.c, s.test_cases.c, s.agents.c
        if self._results_after is None:
            self._results_after = datetime.now(UTC) - timedelta(seconds=self.interval_s)
        async with self.engine.connect() as conn:
            results = (
                await conn.execute(
                    select(
                        r.test_case_id,
                        r.route,
                        r.mcc_mnc,
                        r.delivered,
                        r.late,
                        r.latency_ms,
                        r.latency_error_ms,
                        r.sender_received,
                        r.flags,
                        r.decided_at,
                        t.sender,
                        t.imsi,
                    )
                    .join(s.test_cases, t.id == r.test_case_id)
                    .where(r.decided_at >= self._results_after)
                    .order_by(r.decided_at, r.test_case_id)
                    .limit(MAX_RESULTS_PER_LOOK + len(self._seen_at_edge))
                )
            ).all()
            agents = (await conn.execute(select(a.id, a.state, a.last_seen_at, a.status_at))).all()
        for row in results:
            if row.decided_at == self._results_after and row.test_case_id in self._seen_at_edge:
                continue
            if row.decided_at > self._results_after:
                self._results_after = row.decided_at
                self._seen_at_edge = set()
            self._seen_at_edge.add(row.test_case_id)
            if announce:
                self._send(
                    (
                        "result",
                        {
                            "test_case_id": row.test_case_id,
                            "route": row.route,
                            "mcc_mnc": row.mcc_mnc,
                            "delivered": row.delivered,
                            "late": row.late,
                            "latency_ms": row.latency_ms,
                            "latency_error_ms": row.latency_error_ms,
                            "sender_sent": row.sender,
                            "sender_received": row.sender_received,
                            "imsi": row.imsi,
                            "flags": row.flags or [],
                            "decided_at": _iso(row.decided_at),
                        },
                    )
                )
        for agent in agents:
            before = self._agents.get(agent.id)
            now = (agent.state, agent.last_seen_at)
            self._agents[agent.id] = now
            if announce and before != now:
                self._send(
                    (
                        "agent",
                        {"id": agent.id, "state": agent.state, "last_seen_at": _iso(agent.last_seen_at)},
                    )
                )


LIVE = web.AppKey("ui_live_feed", LiveFeed)


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """GET /events: the live stream (``text/event-stream``) for the signed-in browser."""
    require(request, "viewer")
    feed = request.app[LIVE]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **SECURITY_HEADERS,
        }
    )
    await response.prepare(request)
    queue = feed.subscribe()
    try:
        await response.write(b"retry: 3000\n: live\n\n")
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await response.write(_frame(*item))
    except ConnectionResetError:  # the browser went away
        pass
    finally:
        feed.unsubscribe(queue)
    return response


def setup(app: web.Application, engine: AsyncEngine, ui: UiConfig) -> None:
    """The feed on ``app``, closed when the app shuts down."""

    async def close(app: web.Application) -> None:
        await app[LIVE].close()

    app[LIVE] = LiveFeed(engine, ui.live_poll_interval_s)
    app.on_shutdown.append(close)


ROUTES = [web.get("/events", events)]
