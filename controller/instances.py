"""Which controller instances are alive: a heartbeat row per instance in ``instances``.

Every instance dispatches due tests, claiming each for submit (``test_cases.claimed_by`` names
the instance). A submit in flight when its instance dies has an unknown outcome and must be
failed, but only once that instance is surely gone, never while a live one is submitting it. So
every instance renews its row every ``renew_interval_s`` (``expires_at = now + ttl_s``, the
leader settings, ``[leader]``), and a claim is *orphaned* when no row of its instance is live
(``gone``): its ``expires_at`` lies more than ``max_clock_skew_s`` in the past by the looking
instance's clock, or the row is missing (deleted on a clean stop, or pruned). The same rules as
the leader's lease, and for the same reason (each instance's own UTC clock, NTP-synced):

* an instance claims tests only while ``alive``: until ``ttl_s - max_clock_skew_s`` after the
  start of its last successful renewal, by its monotonic clock, so it never makes a claim that
  another instance may already take for orphaned;
* another instance takes its claims for orphaned only ``ttl_s + max_clock_skew_s`` after that
  renewal (by its own clock, which may run up to the allowance ahead).

Why a table of its own rather than rows in ``leases``: a lease is exclusive and is taken over
when it expires, a heartbeat belongs to one instance for its whole life and is never taken; the
instance ids (host-pid-random, up to 128 characters) do not fit a lease name; and a list of the
running instances is what an operator of several controllers wants to see.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, exists
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from controller.leader import check_timings
from controller.storage import schema as s
from controller.storage.db import dialect_insert
from probe_agent.logs import bind

log = logging.getLogger(__name__)

#: How long ``stop`` waits for the row to be deleted before leaving it to expire.
RELEASE_TIMEOUT_S = 5.0
#: Rows of instances that died are kept this long after they expired (for a look at what ran),
#: then pruned by the leader's recovery pass.
PRUNE_AFTER = timedelta(days=1)


class Heartbeat:
    """This instance's row in ``instances``, renewed every ``renew_interval_s`` while it runs.

    ``start()`` writes the first beat before it returns (or logs why it could not, and keeps
    trying); ``stop()`` deletes the row, so the others take what it left in flight for orphaned at
    once. The settings are the leader's (``[leader]``), with its bounds.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        instance: str,
        *,
        ttl_s: float = 30.0,
        renew_interval_s: float = 10.0,
        max_clock_skew_s: float = 1.0,
    ) -> None:
        check_timings(ttl_s, renew_interval_s, max_clock_skew_s)
        self.engine = engine
        self.instance = instance
        self.ttl_s = ttl_s
        self.renew_interval_s = renew_interval_s
        self.max_clock_skew_s = max_clock_skew_s
        self.started_at = datetime.now(UTC)
        self._valid_until = -math.inf  # monotonic (loop) time until which no one takes us for gone
        self._last_start = -math.inf  # monotonic (loop) time of the last attempt's start
        self._log = bind(log, instance=instance)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def alive(self) -> bool:
        """Whether the last renewal is recent enough for this instance to claim tests now."""
        return asyncio.get_running_loop().time() < self._valid_until

    async def start(self) -> None:
        """Write the first beat, then renew in the background."""
        if self._task is not None:
            raise RuntimeError("the heartbeat is already running")
        await self._attempt()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat {self.instance}")

    async def stop(self, release: bool = True) -> None:
        """Stop renewing and, with ``release``, delete the row: what this instance still has in
        flight is orphaned at once. Call it after the dispatch has stopped. Without ``release`` the
        row is left to expire, as when the process dies."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._valid_until = -math.inf
        if not release:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S), self.engine.begin() as conn:
                await conn.execute(delete(s.instances).where(s.instances.c.id == self.instance))
        except Exception as exc:
            self._log.warning(
                "instance %s could not remove its heartbeat (%s): it expires by itself within %g s",
                self.instance,
                _reason(exc),
                self.ttl_s,
            )
            return
        self._log.info("instance %s removed its heartbeat", self.instance)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._last_start + self.renew_interval_s - loop.time()))
            await self._attempt()

    async def _attempt(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_start = started = loop.time()
        was_alive = self.alive
        try:
            async with asyncio.timeout(self.ttl_s):
                await self.beat(datetime.now(UTC))
        except Exception as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
            if not self._failing:
                self._log.warning(
                    "instance %s cannot renew its heartbeat: %s; it claims no tests once it is %g s old",
                    self.instance,
                    why,
                    self.ttl_s - self.max_clock_skew_s,
                    extra={"instance": self.instance},
                )
            self._failing = True
            return
        self._valid_until = started + self.ttl_s - self.max_clock_skew_s
        if self._failing:
            self._failing = False
            self._log.info("instance %s renews its heartbeat again", self.instance)
        elif not was_alive:
            self._log.info(
                "instance %s is alive (heartbeat every %g s, ttl %g s)",
                self.instance,
                self.renew_interval_s,
                self.ttl_s,
            )

    async def beat(self, now: datetime) -> None:
        """Write the row: renewed at ``now``, expiring ``ttl_s`` later."""
        values = {"renewed_at": now, "expires_at": now + timedelta(seconds=self.ttl_s)}
        async with self.engine.begin() as conn:
            insert = dialect_insert(conn)(s.instances)
            await conn.execute(
                insert.values(id=self.instance, started_at=self.started_at, **values).on_conflict_do_update(
                    index_elements=[s.instances.c.id], set_=values
                )
            )


def gone(
    claimed_by: ColumnElement[str | None], now: datetime, max_clock_skew_s: float
) -> ColumnElement[bool]:
    """SQL: ``claimed_by`` names an instance (not NULL) that has no live heartbeat at ``now``:
    its row expired more than ``max_clock_skew_s`` ago, or there is none."""
    live = exists().where(
        and_(
            s.instances.c.id == claimed_by,
            s.instances.c.expires_at > now - timedelta(seconds=max_clock_skew_s),
        )
    )
    return and_(claimed_by.is_not(None), ~live)


async def prune(conn: AsyncConnection, now: datetime) -> int:
    """Delete the rows of instances that expired more than ``PRUNE_AFTER`` ago; how many."""
    result = await conn.execute(delete(s.instances).where(s.instances.c.expires_at < now - PRUNE_AFTER))
    return result.rowcount


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


__all__ = ["PRUNE_AFTER", "Heartbeat", "gone", "prune"]
