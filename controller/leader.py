"""Leader election between controller instances on one database, by a lease row in ``leases``.

Several controller instances may share one database (ingest split by an MQTT shared
subscription, due tests claimed one at a time). The work that must run exactly once (campaign
rounds, the deadline sweep, the routing table, clock sync) runs only on the instance holding the
lease named ``scheduler``: the leader. Each such piece of work is a *duty* (``add_duty``), a
coroutine started when this instance becomes the leader and cancelled when it stops being it.

The lease, every ``renew_interval_s``, in one transaction::

    UPDATE leases SET holder = me, renewed_at = now, expires_at = now + ttl, acquired_at = ...
     WHERE name = :name AND (holder = me OR expires_at <= now)
    -- no row changed (none yet, or another holder's unexpired lease):
    INSERT INTO leases ... ON CONFLICT (name) DO NOTHING

The lease is ours when a row changed or the insert took. Both statements are atomic on both
databases: on PostgreSQL the UPDATE locks the row, and a concurrent UPDATE waits, then checks its
WHERE again on the committed row (so it sees the new holder and changes nothing); of two INSERTs
of one name the second waits for the first and does nothing. On SQLite the transaction begins
with ``BEGIN IMMEDIATE``, taking the database's one write lock, so attempts run one at a time.

Clocks: lease times are each instance's local wall clock in UTC (``datetime.now(UTC)``, as every
other time the controller stores; SQLite has no server clock), so the instances' clocks must
agree (NTP) within ``max_clock_skew_s``. The leader itself counts on the monotonic clock: it
stops leading ``ttl_s - max_clock_skew_s`` after the start of its last successful renewal, before
any instance whose clock runs up to the allowance ahead could see the lease expire; a renewal
that fails, or finds another holder, steps it down at once. ``holds`` fences a write: inside
the caller's transaction it checks that the lease is still ours and keeps it so until commit.

On a clean stop (``stop()``) the duties are cancelled first and the lease is then released
(``expires_at = now``), so another instance takes over within its renew interval; a leader that
dies is replaced once its lease has expired, ``ttl_s`` after its last renewal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.storage import schema as s
from controller.storage.db import dialect_insert

log = logging.getLogger(__name__)

#: The lease of the controller's singleton work.
SCHEDULER_LEASE = "scheduler"
#: How long ``stop`` waits for the release to be written before leaving the lease to expire.
RELEASE_TIMEOUT_S = 5.0

Duty = Callable[[], Coroutine[Any, Any, None]]


def instance_id() -> str:
    """A controller instance's id: host, process and a random suffix (a restarted process, or a
    container whose pid repeats, is a new instance)."""
    return f"{socket.gethostname()[:80]}-{os.getpid()}-{secrets.token_hex(3)}"


def check_timings(ttl_s: float, renew_interval_s: float, max_clock_skew_s: float) -> None:
    """Raise ValueError unless the timings leave room for a missed renewal and the clock skew:
    renewals more than twice per ttl, the skew below what two renewals leave of the ttl. The
    lease and every instance's heartbeat (``controller.instances``) share these rules."""
    if not 0 < renew_interval_s < ttl_s / 2:
        raise ValueError(f"renew_interval_s ({renew_interval_s:g}) must be below ttl_s / 2 ({ttl_s / 2:g})")
    if not 0 <= max_clock_skew_s < ttl_s - 2 * renew_interval_s:
        raise ValueError("max_clock_skew_s must be below ttl_s - 2 x renew_interval_s")


class Leader:
    """Holds or follows the lease ``name`` for this instance (``holder``), and runs the duties
    while it leads. ``start()`` makes the first attempt before it returns (a lone instance leads
    at once); ``stop()`` steps down and releases the lease."""

    def __init__(
        self,
        engine: AsyncEngine,
        name: str = SCHEDULER_LEASE,
        holder: str | None = None,
        *,
        ttl_s: float = 30.0,
        renew_interval_s: float = 10.0,
        max_clock_skew_s: float = 1.0,
    ) -> None:
        check_timings(ttl_s, renew_interval_s, max_clock_skew_s)
        self.engine = engine
        self.name = name
        self.holder = holder or instance_id()
        self.ttl_s = ttl_s
        self.renew_interval_s = renew_interval_s
        self.max_clock_skew_s = max_clock_skew_s
        #: Set while this instance leads; cleared the moment it steps down.
        self.elected = asyncio.Event()
        self._valid_until = -math.inf  # monotonic (loop) time until which our lease surely holds
        self._duties: dict[str, Duty] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled duties, until they have ended
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._other: str | None = None  # the holder we last saw, while following
        self._failing = False

    @property
    def is_leader(self) -> bool:
        """Whether this instance leads now (its lease renewed in time)."""
        return self.elected.is_set()

    # --- duties

    def add_duty(self, name: str, duty: Duty) -> None:
        """Run ``duty()`` whenever this instance leads (at once if it does now); it is cancelled
        when it stops leading. A duty that ends or fails while leading starts again at the next
        renewal."""
        if name in self._duties:
            raise ValueError(f"duty {name!r} is already registered")
        self._duties[name] = duty
        if self.is_leader:
            self._start_duty(name)

    async def remove_duty(self, name: str) -> None:
        """Stop running ``name``: cancelled now if it runs, never started again."""
        self._duties.pop(name, None)
        task = self._running.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start_duty(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._duties[name](), name=f"leader duty {name}")
        self._running[name] = task
        task.add_done_callback(lambda done: self._duty_ended(name, done))

    def _duty_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if self._running.get(name) is task:
            del self._running[name]
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("leader duty %s failed; it starts again at the next renewal", name, exc_info=error)
        else:
            log.warning("leader duty %s ended; it starts again at the next renewal", name)

    # --- lifecycle

    async def start(self) -> None:
        """Start electing; returns once the first attempt is done (leading or following)."""
        if self._task is not None:
            raise RuntimeError("the leader election is already running")
        self._first.clear()
        self._task = asyncio.create_task(self._run(), name=f"lease {self.name}")
        first = asyncio.create_task(self._first.wait())
        await asyncio.wait({self._task, first}, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if self._task.done():
            self._task.result()  # it failed: say why

    async def stop(self, release: bool = True) -> None:
        """Step down (the duties are cancelled and have ended when this returns) and, with
        ``release``, give the lease up so another instance takes over at its next attempt.
        Without it the lease is left to expire, as when the process dies."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._step_down("stopping")
        if self._ending:  # a step-down that was itself cancelled: its duties end before the release
            await asyncio.gather(*self._ending, return_exceptions=True)
        if release and task is not None:
            await self.release()

    async def release(self) -> bool:
        """Expire our lease now (if we hold it); False when that could not be written."""
        now = datetime.now(UTC)
        leases = s.leases
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S), self.engine.begin() as conn:
                result = await conn.execute(
                    update(leases)
                    .where(and_(leases.c.name == self.name, leases.c.holder == self.holder))
                    .values(expires_at=now)
                )
        except Exception as exc:
            log.warning(
                "instance %s could not release the %s lease (%s): it expires by itself within %g s",
                self.holder,
                self.name,
                _reason(exc),
                self.ttl_s,
            )
            return False
        if result.rowcount:
            log.info("instance %s released the %s lease", self.holder, self.name)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    await self._attempt(started)
                except Exception:
                    log.exception("instance %s: the %s lease attempt failed", self.holder, self.name)
                    await self._step_down("the lease attempt failed")
                self._first.set()
                await asyncio.sleep(max(0.0, started + self.renew_interval_s - loop.time()))
        finally:
            self._first.set()
            await self._step_down("stopping")

    async def _attempt(self, started: float) -> None:
        """One try to take or renew the lease, and what follows from it."""
        if self.is_leader and started >= self._valid_until:
            # The loop was held up past the lease's safe end: others may already have taken over.
            await self._step_down("the lease ran out before it could be renewed")
        limit = self._valid_until - started if self.is_leader else self.ttl_s
        try:
            async with asyncio.timeout(limit):
                held, other = await self._claim(datetime.now(UTC))
        except Exception as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
            if self.is_leader:
                await self._step_down(f"renewing the lease failed: {why}")
            elif not self._failing:
                log.warning("instance %s cannot reach the %s lease: %s", self.holder, self.name, why)
            self._failing = True
            return
        if self._failing:
            self._failing = False
            log.info("instance %s reaches the %s lease again", self.holder, self.name)
        if held:
            self._valid_until = started + self.ttl_s - self.max_clock_skew_s
            if not self.is_leader:
                self._become_leader()
            for name in self._duties.keys() - self._running.keys():
                self._start_duty(name)  # new, or ended since the last renewal
            return
        if self.is_leader:
            await self._step_down(f"the lease is held by {other}")
        if other != self._other:
            self._other = other
            log.info("instance %s follows the leader %s", self.holder, other)

    async def _claim(self, now: datetime) -> tuple[bool, str | None]:
        """Take or renew the lease at ``now``: (ours, the other holder when not)."""
        leases = s.leases
        values = {
            "holder": self.holder,
            "renewed_at": now,
            "expires_at": now + timedelta(seconds=self.ttl_s),
        }
        async with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, for the whole attempt
            renewed = await conn.execute(
                update(leases)
                .where(
                    and_(
                        leases.c.name == self.name,
                        or_(leases.c.holder == self.holder, leases.c.expires_at <= now),
                    )
                )
                .values(
                    acquired_at=case(
                        (leases.c.holder == self.holder, leases.c.acquired_at),
                        else_=literal(now, s.UTCDateTime()),
                    ),
                    **values,
                )
            )
            held = renewed.rowcount == 1
            if not held:
                inserted = await conn.execute(
                    dialect_insert(conn)(leases)
                    .values(name=self.name, acquired_at=now, **values)
                    .on_conflict_do_nothing(index_elements=[leases.c.name])
                    .returning(leases.c.name)
                )
                held = inserted.first() is not None
            other = None
            if not held:
                other = (
                    await conn.execute(select(leases.c.holder).where(leases.c.name == self.name))
                ).scalar_one_or_none()
            await conn.commit()
        return held, other

    def _become_leader(self) -> None:
        self.elected.set()
        self._other = None
        log.info(
            "instance %s is now the leader (lease %s, ttl %g s, renewed every %g s)",
            self.holder,
            self.name,
            self.ttl_s,
            self.renew_interval_s,
        )

    async def _step_down(self, why: str) -> None:
        """Stop leading: every duty is cancelled and has ended when this returns."""
        if not self.is_leader:
            return
        self.elected.clear()
        self._valid_until = -math.inf
        log.log(
            logging.INFO if why == "stopping" else logging.WARNING,
            "instance %s is no longer the leader: %s",
            self.holder,
            why,
        )
        tasks = list(self._running.values())
        self._running.clear()
        self._ending.update(tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ending.difference_update(tasks)

    # --- fencing

    async def holds(self, conn: AsyncConnection) -> bool:
        """Inside the caller's write transaction: whether this instance leads and the lease is
        still its own. The lease then stays so until that transaction ends: PostgreSQL keeps the
        row locked (FOR SHARE) against a takeover; on SQLite the caller holds the write lock
        (``BEGIN IMMEDIATE``), so no other instance writes the lease meanwhile."""
        if not self.is_leader:
            return False
        leases = s.leases
        row = (
            await conn.execute(
                select(leases.c.holder)
                .where(
                    and_(
                        leases.c.name == self.name,
                        leases.c.holder == self.holder,
                        leases.c.expires_at > datetime.now(UTC),
                    )
                )
                .with_for_update(read=True)
            )
        ).first()
        return row is not None


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


__all__ = ["SCHEDULER_LEASE", "Duty", "Leader", "instance_id"]
