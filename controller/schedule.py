"""The scheduler: campaigns become test cases, and due test cases are submitted.

Two parts, both on the controller's database:

* **Rounds.** Every active campaign has one persisted APScheduler job (``campaign:<id>``, an
  interval trigger of the campaign's cadence) in the table ``scheduler_jobs``, which our own
  migrations create. A round (``plan_round``) writes the test cases of every route x target pair,
  spread over the cadence, inside the allowed hours and the daily budgets. The job function is
  referenced by text with picklable arguments (APScheduler's rule for persisted jobs) and finds
  the running ``Scheduler`` in a module-level registry. ``sync_campaigns`` keeps the jobs in step
  with the campaigns table (added, cadence changed, paused, deleted): at start, every
  ``sync_interval_s``, and whenever the API calls it after a change.
* **Dispatch.** A loop (``dispatch_due`` every ``dispatch_interval_s``) claims the due tests
  atomically (``scheduled`` -> ``submitting``, so nothing is submitted twice), checks once more
  that the probe is online and registered, and submits through a ``controller.submit.Submitter``
  (the bundled sender).
* **Several instances.** With a ``controller.leader.Leader`` (the service passes one), the
  rounds are a leader duty: APScheduler starts paused and processes the jobs only while this
  instance leads (resumed with a sync of the jobs when it becomes the leader, paused and its
  rounds in progress cancelled when it stops being it), the registry names a scheduler only
  while it leads, and every round checks the lease inside its own transaction (``Leader.holds``)
  before it writes: a follower never plans a round, even one APScheduler handed over in the
  moment it stepped down (that round is dropped; the campaign's next comes a cadence later).
  The job store is written only by the leader (``sync_campaigns``).
  Dispatch runs on every instance: its claims keep them apart.
* **Submits cut short.** A claim names its instance (``test_cases.claimed_by``), and every
  instance keeps a heartbeat (``controller.instances.Heartbeat``, the service passes one). A test
  left in ``submitting`` may have gone out: it becomes ``failed``, outcome unknown, its price
  still counted, but only once the instance that claimed it is gone, never while a live one is
  submitting it. At start (``_recover_interrupted``) an instance fails the tests of instances
  without a live heartbeat, those of its own id (a previous life) and those claimed before claims
  named their instance (NULL, as every ``submitting`` test was failed at start before); on a
  clean stop it fails its own that did not finish in ``STOP_GRACE_S``; and the leader, in its
  deadline sweep (``controller.recovery.recover_orphaned``), fails those of an instance that
  died, once its heartbeat has expired (``[leader] ttl_s + max_clock_skew_s`` after its last
  renewal). An instance whose own heartbeat could not be renewed in time claims nothing until
  it is renewed again.

Decisions, in short:

* A target that is offline or unregistered when a round is planned is skipped without a row:
  it is logged with its reason and listed in the round's ``RoundPlan``, never counted against a
  route, and costs nothing. A test whose probe went away before its send time (or whose time
  was missed while the controller was stopped) becomes ``skipped`` with the reason and price 0.
* Budgets are per campaign and UTC day (of the planned send time), per route and per network:
  the prices of the campaign's tests in every state but ``skipped`` add up to at most the budget.
  Tests that surely cost nothing (skipped, or refused by the route) have their price set to 0;
  a submit with an unknown outcome (timed out, controller stopped) keeps its price, as it may
  have been charged. The check and the insert are one transaction, serialised per campaign
  (``SELECT ... FOR UPDATE`` of the campaign row on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite),
  so concurrent rounds cannot overspend. An unknown price while a budget is set skips the pair.
* Spreading: the pairs of a round sit on an even grid over the cadence, route-major, so the
  tests to one probe are ``cadence / routes`` apart; each send then moves by the campaign's
  jitter, clamped to a quarter of that gap, so they stay at least half of it apart (also across
  rounds, which start exactly one cadence apart: the trigger itself has no jitter, as
  APScheduler's accumulates and would only shrink the gaps). The route order is shuffled each
  round, so no route is always first at the edges of the allowed hours.
* A submit refused with a retryable error is tried once more ``retry_after_s`` later, in place
  (same test case and token), if that is still inside the cadence, the allowed hours and the same
  UTC day; a scheduled test with an ``error`` is such a retry. Otherwise it is ``failed``.

APScheduler 3's job store is synchronous: its queries run in a worker thread, never on the
event loop, and the rounds themselves run as coroutines on the loop (``controller.job_store``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import ValidationError
from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from controller.campaigns import CampaignDefinition
from controller.config import ScheduleConfig
from controller.correlation import Template, new_token, render
from controller.instances import Heartbeat, gone
from controller.job_store import LoopExecutor, OffLoopScheduler, job_store_engine, sync_url
from controller.leader import Leader, instance_id
from controller.recovery import fail_submitting
from controller.storage import schema as s
from controller.storage.db import masked
from controller.submit import SubmitError, SubmitRequest, Submitted, Submitter
from probe_agent.logs import bind

log = logging.getLogger(__name__)

#: The job function, by its textual reference: a persisted job names its function this way.
JOB_FUNCTION = "controller.schedule:run_campaign_round"
JOB_PREFIX = "campaign:"
#: Registration states in which a SIM receives SMS (``probe_agent.modem`` writes the long forms).
REGISTERED = frozenset({"registered_home", "registered_roaming", "home", "roaming"})
#: States whose price counts against the budgets: all but ``skipped``. Refused submits are
#: ``failed`` with price 0; a failed submit with an unknown outcome keeps its price.
BUDGETED = ("scheduled", "submitting", "submitted", "done", "failed")
#: States that hold a (route, probe) pair: a new round does not pile another test onto it.
PENDING = ("scheduled", "submitting")
#: Jitter moves a send by at most this share of the gap between two tests to one probe.
JITTER_SHARE_OF_GAP = 0.25
#: A probe not tested for this long counts as never tested when choosing a network's probe.
LAST_TESTED_WINDOW = timedelta(days=1)
#: Budget comparisons tolerate float rounding of summed prices.
BUDGET_EPSILON = 1e-9
#: How long ``stop`` lets submits in flight finish before cancelling them (they are then marked
#: failed, outcome unknown: by ``stop`` itself, or, if it cannot write that, by whoever finds them).
STOP_GRACE_S = 5.0
#: Dispatch passes running at once, at most (each waits for its submits).
MAX_OVERLAPPING_PASSES = 4

#: The running schedulers of this process, by ``Scheduler.key``: how a job finds its scheduler
#: (with a leader: only while it leads).
_RUNNING: dict[str, Scheduler] = {}
#: The name of the rounds' duty with the leader.
ROUNDS_DUTY = "campaign rounds"


async def run_campaign_round(scheduler_key: str, campaign_id: int) -> None:
    """The persisted job of a campaign: plan one round on the scheduler running for its database."""
    scheduler = _RUNNING.get(scheduler_key)
    if scheduler is None:
        log.warning("campaign %d: round due but no scheduler runs for its database here", campaign_id)
        return
    try:
        await scheduler.plan_round(campaign_id)
    except Exception:
        log.exception("campaign %d: round failed", campaign_id)


# --- results of a round and a dispatch pass ----------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A test case a round created."""

    test_case_id: int
    route: str
    imsi: str
    mcc_mnc: str
    template: Template
    token: str
    scheduled_at: datetime
    price: float | None


@dataclass(frozen=True)
class Skip:
    """A route x target pair a round did not test, and why; no test case was written."""

    route: str
    #: ``probe <imsi>`` or ``network <mcc-mnc>``, as the campaign lists it.
    target: str
    reason: str
    #: The probe that would have received it, when one was chosen.
    imsi: str | None = None


@dataclass
class RoundPlan:
    """What one round of a campaign did."""

    campaign_id: int
    planned_at: datetime
    created: list[Planned] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    #: Why the whole round planned nothing (campaign paused, deleted, invalid); None otherwise.
    reason: str | None = None


@dataclass
class DispatchReport:
    """What one dispatch pass did, by test case id."""

    submitted: list[int] = field(default_factory=list)
    #: Refused or of unknown outcome, with the reason.
    failed: dict[int, str] = field(default_factory=dict)
    #: Refused with a retryable error, to be tried again at this time.
    retrying: dict[int, datetime] = field(default_factory=dict)
    #: Not submitted (probe offline or unregistered, time missed), with the reason.
    skipped: dict[int, str] = field(default_factory=dict)


@dataclass
class SyncReport:
    """What ``sync_campaigns`` changed, by campaign id."""

    added: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


# --- pure helpers ------------------------------------------------------------------------------


def probe_problem(
    *,
    agent_state: str | None,
    connected: bool | None,
    registration: str | None,
    msisdn: str | None,
    mcc_mnc: str | None,
) -> str | None:
    """Why a probe cannot receive a test now, or None when it can."""
    if agent_state != "online":
        return f"probe offline (agent {agent_state or 'unknown'})"
    if not connected:
        return "probe offline (modem not connected)"
    if registration not in REGISTERED:
        return f"probe not registered ({registration or 'unknown'})"
    if not msisdn:
        return "probe has no MSISDN"
    if not mcc_mnc:
        return "probe network unknown"
    return None


def in_allowed_hours(definition: CampaignDefinition, at: datetime) -> bool:
    """Whether a send at ``at`` falls in the campaign's allowed hours (its own time zone)."""
    if not definition.allowed_hours:
        return True
    local = at.astimezone(definition.zone).time()
    return any(window.contains(local) for window in definition.allowed_hours)


def spread(
    start: datetime,
    cadence_s: float,
    n_routes: int,
    n_targets: int,
    jitter_s: float,
    rng: random.Random,
) -> list[list[datetime]]:
    """Send times of a round, ``[route][target]``: an even grid over the cadence, route-major, so
    the tests to one target are ``cadence / n_routes`` apart, each moved by up to the jitter
    (clamped to a quarter of that gap) and never before ``start``."""
    slot_s = cadence_s / (n_routes * n_targets)
    jitter = min(jitter_s, JITTER_SHARE_OF_GAP * cadence_s / n_routes)
    times: list[list[datetime]] = []
    for r in range(n_routes):
        row = []
        for t in range(n_targets):
            offset = (r * n_targets + t) * slot_s + (rng.uniform(-jitter, jitter) if jitter else 0.0)
            row.append(start + timedelta(seconds=max(offset, 0.0)))
        times.append(row)
    return times


def _next_template(templates: Sequence[Template], last: str | None) -> Template:
    """The template after ``last`` in the campaign's list (the first one after none, or after
    one no longer listed)."""
    for i, template in enumerate(templates):
        if template == last:
            return templates[(i + 1) % len(templates)]
    return templates[0]


def _utc_day(at: datetime) -> tuple[date, datetime, datetime]:
    day = at.astimezone(UTC).date()
    begin = datetime.combine(day, time(0), UTC)
    return day, begin, begin + timedelta(days=1)


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.utcoffset() is None:
        raise ValueError(f"naive datetime {now.isoformat()}: give it a time zone (UTC)")
    return now.astimezone(UTC)


def _price(prices: Any, mcc_mnc: str) -> float | None:
    value = prices.get(mcc_mnc) if isinstance(prices, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        price = float(value)
    except ValueError:
        return None
    return price if price >= 0 else None


# --- the scheduler -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    imsi: str
    msisdn: str
    mcc_mnc: str


@dataclass(frozen=True)
class _Target:
    label: str
    probe: _Probe | None
    problem: str | None


@dataclass(frozen=True)
class _Claim:
    id: int
    campaign_id: int | None
    route: str
    imsi: str
    msisdn: str
    sender: str
    text: str
    scheduled_at: datetime
    deadline: timedelta
    error: str | None


class Scheduler:
    """Campaign rounds as persisted APScheduler jobs, and the dispatch of due tests.

    ``database_url`` is the controller's (the engine's) URL: the job store opens its own
    synchronous connection to the same database (see ``sync_url``). ``rng`` drives jitter and the
    route order (seed it in tests); tokens always come from the system's secure source. With a
    ``leader`` the rounds run only while this instance leads (see the module docstring); without
    one this scheduler is the only one and always runs them. With a ``heartbeat`` (started before
    ``start``) claims name its instance, dispatch claims only while it is alive, and the recovery
    at start spares the submits of live instances; without one this scheduler counts as the only
    dispatcher, and every test left in ``submitting`` is failed at start.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        config: ScheduleConfig,
        submitter: Submitter,
        database_url: str,
        *,
        rng: random.Random | None = None,
        leader: Leader | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self._engine = engine
        self._config = config
        self._submitter = submitter
        self._database_url = database_url
        self._rng = rng if rng is not None else random.Random()
        #: Names this database in the persisted jobs' arguments (a hash: no host or user in them).
        self.key = hashlib.sha256(masked(sync_url(database_url)).encode()).hexdigest()[:16]
        self._aps: OffLoopScheduler | None = None
        self._executor: LoopExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[DispatchReport]] = set()
        self._slots = asyncio.Semaphore(config.max_concurrent_submits)
        self._sync_lock = asyncio.Lock()
        #: Campaigns whose definition does not validate, logged once rather than at every sync.
        self._invalid: set[int] = set()
        self._leader = leader
        #: Whether this scheduler runs the rounds and writes the job store now.
        self._leading = False
        self._heartbeat = heartbeat
        #: The instance id written into the claims (``test_cases.claimed_by``).
        self.instance = heartbeat.instance if heartbeat else leader.holder if leader else instance_id()
        self._lapsed = False  # dispatch held back: our heartbeat is not fresh (logged once)

    # --- lifecycle

    async def start(self) -> None:
        """Recover submits a stopped controller left in flight, start the job scheduler on the
        persisted jobs, reconcile them with the campaigns, and start dispatching. With a leader,
        the job scheduler starts paused and the rounds become its duty (``_lead``)."""
        if not self._config.enabled:
            log.info("scheduler disabled in the config: this controller plans and submits no tests")
            return
        if self._aps is not None:
            raise RuntimeError("the scheduler is already running")
        gated = self._leader is not None
        if not gated and self.key in _RUNNING:
            raise RuntimeError(f"a scheduler already runs for {masked(self._database_url)} in this process")
        await self._recover_interrupted()
        loop = asyncio.get_running_loop()
        executor = LoopExecutor(loop)
        aps = OffLoopScheduler(
            event_loop=loop,
            timezone=UTC,
            jobstores={
                "default": SQLAlchemyJobStore(
                    engine=job_store_engine(self._database_url), tablename="scheduler_jobs"
                )
            },
            executors={"default": executor},
            job_defaults={
                "coalesce": True,  # after an outage, one round, not one per missed cadence
                "max_instances": 1,
                "misfire_grace_time": self._misfire_grace(),
            },
        )
        executor.paused = gated
        if not gated:
            _RUNNING[self.key] = self
            self._leading = True
        try:
            await asyncio.to_thread(aps.start, gated)  # paused until this instance leads
        except BaseException:
            self._leading = False
            if not gated:
                del _RUNNING[self.key]
            raise
        self._aps, self._executor = aps, executor
        if self._leader is not None:
            self._leader.add_duty(ROUNDS_DUTY, self._lead)
        else:
            try:
                await self.sync_campaigns()
            except BaseException:
                await self.stop()
                raise
        self._loop_task = asyncio.create_task(self._run(), name="schedule-dispatch")
        log.info("scheduler started on %s", masked(self._database_url))

    async def _lead(self) -> None:
        """The leader duty: while this instance leads, own the campaign jobs and run their rounds
        (due ones first, as far as ``misfire_grace_s`` allows); when cancelled (stepped down),
        pause them and cancel the rounds in progress, which roll back."""
        aps, executor = self._running(), self._executor
        assert executor is not None
        other = _RUNNING.get(self.key)
        if other is not None and other is not self:
            log.warning("scheduler: another scheduler of this process was registered for its database")
        _RUNNING[self.key] = self
        self._leading = True
        executor.paused = False
        try:
            try:
                await self.sync_campaigns()
            except Exception:
                log.exception("scheduler: reconciling the campaign jobs failed; retrying at the next sync")
            aps.resume()  # wakes it: due jobs are processed now
            log.info("scheduler: this instance runs the campaign rounds")
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._leading = False
            executor.paused = True
            if aps.state != STATE_STOPPED:
                aps.pause()
            if _RUNNING.get(self.key) is self:
                del _RUNNING[self.key]
            await executor.cancel_running()
            log.info("scheduler: campaign rounds paused on this instance")

    async def stop(self) -> None:
        """Stop the rounds and the dispatch; submits in flight get ``STOP_GRACE_S`` to finish."""
        if self._leader is not None:
            await self._leader.remove_duty(ROUNDS_DUTY)
        self._leading = False
        tc = s.test_cases
        dispatching = self._loop_task is not None
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        aps, executor = self._aps, self._executor
        if aps is not None and executor is not None:
            await asyncio.to_thread(aps.shutdown, False)  # may wait for a job-store pass
            aps._stop_timer()
            await aps.finished()
            await asyncio.sleep(0)  # jobs that pass submitted are started (and refused) now
            await executor.aclose()  # a round cut short rolls back: all of it or nothing
        self._aps = self._executor = None
        if _RUNNING.get(self.key) is self:
            del _RUNNING[self.key]
        if self._passes:
            _, pending = await asyncio.wait(self._passes, timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._passes, return_exceptions=True)
        if dispatching:
            # Nothing of ours is in flight any more: what was cut short is failed now, not left
            # for whoever finds it once our heartbeat is gone.
            try:
                await fail_submitting(
                    self._engine, tc.c.claimed_by == self.instance, "cut short by its instance's stop"
                )
            except Exception as exc:
                log.warning(
                    "scheduler: could not mark the submits cut short by the stop as failed (%s): they "
                    "are recovered once this instance's heartbeat is gone",
                    exc,
                )
        log.info("scheduler stopped")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self._config.sync_interval_s
        while True:
            # Each pass is a task: a slow submit must not hold back the tests due after it. Passes
            # may overlap (claims keep them apart), up to a bound while the database is slow.
            if len(self._passes) < MAX_OVERLAPPING_PASSES:
                task = asyncio.create_task(self._dispatch_pass())
                self._passes.add(task)
                task.add_done_callback(self._passes.discard)
            if loop.time() >= next_sync:
                next_sync = loop.time() + self._config.sync_interval_s
                try:
                    await self.sync_campaigns()
                except Exception:
                    log.exception("scheduler: reconciling the campaign jobs failed")
            await asyncio.sleep(self._config.dispatch_interval_s)

    async def _dispatch_pass(self) -> DispatchReport:
        try:
            return await self.dispatch_due()
        except Exception:
            log.exception("scheduler: dispatch pass failed")
            return DispatchReport()

    def _misfire_grace(self) -> int:
        return max(1, round(self._config.misfire_grace_s))

    def _running(self) -> OffLoopScheduler:
        if self._aps is None:
            raise RuntimeError("the scheduler is not running: call start() first")
        return self._aps

    # --- campaign jobs

    async def sync_campaigns(self) -> SyncReport:
        """Make the jobs match the campaigns: one per active campaign with its cadence; none for a
        paused, deleted or invalid one. A new campaign's first round runs at once. Call it after
        changing campaigns; when this scheduler is not running (disabled) or not the leader's it
        does nothing, and the leader's catches up within ``sync_interval_s``."""
        aps = self._aps
        if aps is None or not self._leading:
            return SyncReport()
        async with self._sync_lock:
            async with self._engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(s.campaigns.c.id, s.campaigns.c.definition, s.campaigns.c.paused)
                    )
                ).all()
            wanted: dict[str, tuple[int, float]] = {}
            invalid: set[int] = set()
            for row in rows:
                if row.paused:
                    continue
                try:
                    definition = CampaignDefinition.model_validate(row.definition)
                except ValidationError as exc:
                    invalid.add(row.id)
                    if row.id not in self._invalid:
                        log.error("campaign %d: invalid definition, not scheduled: %s", row.id, exc)
                    continue
                wanted[f"{JOB_PREFIX}{row.id}"] = (row.id, definition.cadence_s)
            self._invalid = invalid
            jobs = await asyncio.to_thread(aps.get_jobs)
            return await asyncio.to_thread(self._apply_jobs, aps, wanted, jobs)

    def _apply_jobs(
        self, aps: OffLoopScheduler, wanted: dict[str, tuple[int, float]], jobs: list[Any]
    ) -> SyncReport:
        """Runs in a worker thread: every call below reads or writes the job store."""
        report = SyncReport()
        existing = {job.id: job for job in jobs if job.id.startswith(JOB_PREFIX)}
        for job_id in existing.keys() - wanted.keys():
            try:
                aps.remove_job(job_id)
            except JobLookupError:
                continue  # removed meanwhile
            report.removed.append(int(job_id.removeprefix(JOB_PREFIX)))
            log.info("campaign %s: job removed (paused or deleted)", job_id.removeprefix(JOB_PREFIX))
        for job_id, (campaign_id, cadence_s) in wanted.items():
            args = (self.key, campaign_id)
            job = existing.get(job_id)
            if job is None:
                aps.add_job(
                    JOB_FUNCTION,
                    trigger=IntervalTrigger(seconds=cadence_s, timezone=UTC),
                    args=args,
                    id=job_id,
                    name=f"campaign {campaign_id}",
                    replace_existing=True,
                    next_run_time=datetime.now(UTC),
                )
                report.added.append(campaign_id)
                log.info("campaign %d: job added, a round every %g s", campaign_id, cadence_s)
                continue
            trigger = job.trigger
            if not isinstance(trigger, IntervalTrigger) or trigger.interval_length != cadence_s:
                aps.reschedule_job(job_id, trigger=IntervalTrigger(seconds=cadence_s, timezone=UTC))
                report.changed.append(campaign_id)
                log.info("campaign %d: cadence now %g s", campaign_id, cadence_s)
            if tuple(job.args) != args or job.misfire_grace_time != self._misfire_grace():
                aps.modify_job(job_id, args=args, misfire_grace_time=self._misfire_grace())
                if campaign_id not in report.changed:
                    report.changed.append(campaign_id)
        return report

    async def next_runs(self) -> dict[int, datetime | None]:
        """Each scheduled campaign's next round (None: paused job), from the job store."""
        jobs = await asyncio.to_thread(self._running().get_jobs)
        return {
            int(job.id.removeprefix(JOB_PREFIX)): job.next_run_time
            for job in jobs
            if job.id.startswith(JOB_PREFIX)
        }

    # --- rounds

    async def plan_round(self, campaign_id: int, now: datetime | None = None) -> RoundPlan:
        """Write the test cases of one round of a campaign, starting at ``now`` (aware; default
        the current time), and say what was created and what skipped, and why."""
        now = _aware(now)
        plan = RoundPlan(campaign_id=campaign_id, planned_at=now)
        async with self._engine.connect() as conn:
            await _begin_write(conn)
            # With a leader: only while this instance holds the lease, which stays so until commit
            # (locked on PostgreSQL; SQLite's write lock keeps every other writer out).
            leading = self._leader is None or await self._leader.holds(conn)
            # Locks the campaign row on PostgreSQL until commit: rounds of one campaign (and so
            # their budget checks) go one at a time. SQLite's BEGIN IMMEDIATE already did.
            row = (
                (
                    await conn.execute(
                        select(s.campaigns.c.definition, s.campaigns.c.paused)
                        .where(s.campaigns.c.id == campaign_id)
                        .with_for_update()
                    )
                ).one_or_none()
                if leading
                else None
            )
            if not leading:
                plan.reason = "this controller instance is not the leader"
            elif row is None:
                plan.reason = "campaign not found"
            elif row.paused:
                plan.reason = "campaign paused"
            else:
                try:
                    definition = CampaignDefinition.model_validate(row.definition)
                except ValidationError as exc:
                    plan.reason = f"invalid definition ({exc.error_count()} errors)"
                else:
                    await self._plan(conn, plan, definition)
            await conn.commit()
        self._log_plan(plan)
        return plan

    async def _plan(self, conn: AsyncConnection, plan: RoundPlan, definition: CampaignDefinition) -> None:
        campaign_id, now = plan.campaign_id, plan.planned_at
        tc = s.test_cases
        routes = {
            r.name: r
            for r in (
                await conn.execute(select(s.routes).where(s.routes.c.name.in_(definition.routes)))
            ).all()
        }
        targets = await self._targets(conn, definition, now)
        # Tests still to be sent; older scheduled ones were missed and will be skipped at dispatch.
        recent = now - timedelta(seconds=self._config.late_submit_s + self._config.submit_timeout_s)
        pending = {
            (r.route, r.imsi)
            for r in await conn.execute(
                select(tc.c.route, tc.c.imsi).where(
                    and_(
                        tc.c.campaign_id == campaign_id,
                        tc.c.status.in_(PENDING),
                        tc.c.scheduled_at >= recent,
                    )
                )
            )
        }
        # Templates in turn per (route, network), following the last one used in the previous
        # rounds: routes to one network test the same template in a round (a fair comparison).
        previous = now - timedelta(seconds=2 * definition.cadence_s + self._config.late_submit_s)
        last_template: dict[tuple[str, str], str | None] = {
            (r.route, r.mcc_mnc): r.template
            for r in await conn.execute(
                select(tc.c.route, tc.c.mcc_mnc, tc.c.template)
                .where(and_(tc.c.campaign_id == campaign_id, tc.c.scheduled_at >= previous))
                .order_by(tc.c.scheduled_at, tc.c.id)
            )
        }
        spent: dict[tuple[str, str, date], float] = {}

        async def spent_on(column: str, value: str, at: datetime) -> tuple[tuple[str, str, date], float]:
            day, begin, end = _utc_day(at)
            key = (column, value, day)
            if key not in spent:
                total = (
                    await conn.execute(
                        select(func.coalesce(func.sum(tc.c.price), 0.0)).where(
                            and_(
                                tc.c.campaign_id == campaign_id,
                                tc.c.status.in_(BUDGETED),
                                tc.c[column] == value,
                                tc.c.scheduled_at >= begin,
                                tc.c.scheduled_at < end,
                            )
                        )
                    )
                ).scalar_one()
                spent[key] = float(total)
            return key, spent[key]

        route_names = list(definition.routes)
        self._rng.shuffle(route_names)
        times = spread(
            now, definition.cadence_s, len(route_names), len(targets), definition.jitter_s, self._rng
        )
        deadline = timedelta(seconds=definition.deadline_s or self._config.deadline_s)
        rows: list[dict[str, Any]] = []
        for r, route_name in enumerate(route_names):
            route = routes.get(route_name)
            for t, target in enumerate(targets):
                at = times[r][t]
                probe = target.probe
                price: float | None = None
                charged: list[tuple[str, str, date]] = []
                reason: str | None = None
                if not in_allowed_hours(definition, at):
                    reason = f"outside allowed hours ({definition.timezone})"
                elif route is None:
                    reason = "unknown route"
                elif not route.enabled:
                    reason = "route disabled"
                elif probe is None:
                    reason = target.problem or "no probe"
                elif (route_name, probe.imsi) in pending:
                    reason = "the previous test of this route to this probe is still pending"
                else:
                    price = _price(route.prices, probe.mcc_mnc)
                    budgets = (
                        ("route", route_name, definition.daily_budget_per_route),
                        ("mcc_mnc", probe.mcc_mnc, definition.daily_budget_per_network),
                    )
                    if price is None and any(limit is not None for *_, limit in budgets):
                        reason = (
                            f"price unknown for network {probe.mcc_mnc} on this route, and a budget is set"
                        )
                    for column, value, limit in budgets if reason is None else ():
                        if limit is None:
                            continue
                        key, total = await spent_on(column, value, at)
                        charged.append(key)
                        if total + (price or 0.0) > limit + BUDGET_EPSILON:
                            kind = "route" if column == "route" else f"network {value}"
                            reason = f"daily budget of the {kind} reached ({total:g} spent of {limit:g})"
                            break
                if reason is not None or probe is None:
                    plan.skipped.append(
                        Skip(route_name, target.label, reason or "no probe", probe.imsi if probe else None)
                    )
                    continue
                for key in charged:
                    spent[key] += price or 0.0
                template = _next_template(
                    definition.templates, last_template.get((route_name, probe.mcc_mnc))
                )
                last_template[route_name, probe.mcc_mnc] = template
                pending.add((route_name, probe.imsi))
                token = new_token()
                rows.append(
                    {
                        "token": str(token),
                        "campaign_id": campaign_id,
                        "route": route_name,
                        "imsi": probe.imsi,
                        "msisdn": probe.msisdn,
                        "mcc_mnc": probe.mcc_mnc,
                        "sender": definition.sender,
                        "text": render(token, template),
                        "template": template,
                        "scheduled_at": at,
                        "deadline_at": at + deadline,
                        "status": "scheduled",
                        "price": price,
                    }
                )
        if not rows:
            return
        inserted = await conn.execute(tc.insert().returning(tc.c.id, sort_by_parameter_order=True), rows)
        for values, (test_case_id,) in zip(rows, inserted.all(), strict=True):
            plan.created.append(
                Planned(
                    test_case_id=test_case_id,
                    route=values["route"],
                    imsi=values["imsi"],
                    mcc_mnc=values["mcc_mnc"],
                    template=values["template"],
                    token=values["token"],
                    scheduled_at=values["scheduled_at"],
                    price=values["price"],
                )
            )

    async def _targets(
        self, conn: AsyncConnection, definition: CampaignDefinition, now: datetime
    ) -> list[_Target]:
        """The round's targets: each listed probe, then one probe per listed network (online,
        registered, least recently tested first; a probe the campaign also lists by IMSI last)."""
        p, a, tc = s.probes, s.agents, s.test_cases
        rows = (
            await conn.execute(
                select(p.c.imsi, p.c.msisdn, p.c.mcc_mnc, p.c.connected, p.c.registration, a.c.state)
                .select_from(p.outerjoin(a, p.c.agent_id == a.c.id))
                .where((p.c.imsi.in_(definition.probes)) | (p.c.mcc_mnc.in_(definition.networks)))
            )
        ).all()

        def problem(row: Any) -> str | None:
            return probe_problem(
                agent_state=row.state,
                connected=row.connected,
                registration=row.registration,
                msisdn=row.msisdn,
                mcc_mnc=row.mcc_mnc,
            )

        by_imsi = {row.imsi: row for row in rows}
        targets: list[_Target] = []
        for imsi in definition.probes:
            row = by_imsi.get(imsi)
            label = f"probe {imsi}"
            if row is None:
                targets.append(_Target(label, None, "unknown probe"))
            elif (why := problem(row)) is not None:
                targets.append(_Target(label, None, why))
            else:
                targets.append(_Target(label, _Probe(row.imsi, row.msisdn, row.mcc_mnc), None))
        if not definition.networks:
            return targets
        usable = [row for row in rows if row.mcc_mnc in definition.networks and problem(row) is None]
        last: dict[str, datetime] = {}
        if usable:
            last = {
                r.imsi: r.last
                for r in await conn.execute(
                    select(tc.c.imsi, func.max(tc.c.scheduled_at).label("last"))
                    .where(
                        and_(
                            tc.c.imsi.in_([row.imsi for row in usable]),
                            tc.c.status != "skipped",
                            tc.c.scheduled_at >= now - LAST_TESTED_WINDOW,
                        )
                    )
                    .group_by(tc.c.imsi)
                )
            }
        never = datetime.min.replace(tzinfo=UTC)
        listed = set(definition.probes)
        for network in definition.networks:
            candidates = sorted(
                (row for row in usable if row.mcc_mnc == network),
                key=lambda row: (row.imsi in listed, last.get(row.imsi) or never, row.imsi),
            )
            label = f"network {network}"
            if candidates:
                best = candidates[0]
                targets.append(_Target(label, _Probe(best.imsi, best.msisdn, best.mcc_mnc), None))
            else:
                targets.append(_Target(label, None, f"no online, registered probe in network {network}"))
        return targets

    def _log_plan(self, plan: RoundPlan) -> None:
        cid = plan.campaign_id
        if plan.reason:
            log.info("campaign %d: round planned nothing: %s", cid, plan.reason)
            return
        reasons = {skip.reason for skip in plan.skipped}
        if not plan.created and len(reasons) == 1:
            log.info("campaign %d: round skipped, all %d pairs: %s", cid, len(plan.skipped), reasons.pop())
            return
        for planned in plan.created:
            bind(log, route=planned.route, test_id=planned.test_case_id).info(
                "campaign %d: test planned to probe %s (%s) at %s, template %s",
                cid,
                planned.imsi,
                planned.mcc_mnc,
                planned.scheduled_at.isoformat(),
                planned.template,
            )
        for skip in plan.skipped:
            bind(log, route=skip.route).info(
                "campaign %d: %s%s skipped: %s",
                cid,
                skip.target,
                f" (probe {skip.imsi})" if skip.imsi and skip.imsi not in skip.target else "",
                skip.reason,
            )

    # --- dispatch

    async def dispatch_due(self, now: datetime | None = None) -> DispatchReport:
        """Submit the tests due at ``now`` (aware; default the current time): each is claimed
        once, its probe checked again, then submitted; see ``DispatchReport``."""
        now = _aware(now)
        report = DispatchReport()
        tc, p, a = s.test_cases, s.probes, s.agents
        if self._heartbeat is not None and not self._heartbeat.alive:
            # Others may take this instance for gone, and fail its claims: it makes none now.
            if not self._lapsed:
                bind(log, instance=self.instance).warning(
                    "scheduler: instance %s dispatches nothing until its heartbeat is renewed", self.instance
                )
            self._lapsed = True
            return report
        if self._lapsed:
            self._lapsed = False
            bind(log, instance=self.instance).info("scheduler: instance %s dispatches again", self.instance)
        async with self._engine.connect() as conn:  # a cheap look first: no write lock when idle
            due = (
                (
                    await conn.execute(
                        select(tc.c.id)
                        .where(and_(tc.c.status == "scheduled", tc.c.scheduled_at <= now))
                        .order_by(tc.c.scheduled_at, tc.c.id)
                        .limit(self._config.dispatch_batch)
                    )
                )
                .scalars()
                .all()
            )
        if not due:
            return report
        claims: list[_Claim] = []
        skipped: list[Any] = []
        async with self._engine.connect() as conn:
            await _begin_write(conn)
            rows = (
                await conn.execute(
                    select(tc, p.c.connected, p.c.registration, p.c.msisdn.label("probe_msisdn"), a.c.state)
                    .select_from(tc.outerjoin(p, tc.c.imsi == p.c.imsi).outerjoin(a, p.c.agent_id == a.c.id))
                    .where(and_(tc.c.id.in_(due), tc.c.status == "scheduled", tc.c.scheduled_at <= now))
                    .order_by(tc.c.scheduled_at, tc.c.id)
                )
            ).all()
            for row in rows:
                late_s = (now - row.scheduled_at).total_seconds()
                reason = (
                    f"missed its send time by {late_s:.0f} s (controller stopped?)"
                    if late_s > self._config.late_submit_s
                    else probe_problem(
                        agent_state=row.state,
                        connected=row.connected,
                        registration=row.registration,
                        msisdn=row.probe_msisdn,
                        mcc_mnc=row.mcc_mnc,
                    )
                )
                values: dict[str, Any] = (
                    {"status": "skipped", "price": 0.0, "error": reason}
                    if reason
                    else {"status": "submitting", "submitted_at": now, "claimed_by": self.instance}
                )
                claimed = await conn.execute(
                    update(tc).where(and_(tc.c.id == row.id, tc.c.status == "scheduled")).values(**values)
                )
                if claimed.rowcount != 1:
                    continue  # another dispatcher took it
                if reason:
                    report.skipped[row.id] = reason
                    skipped.append(row)
                    continue
                claims.append(
                    _Claim(
                        id=row.id,
                        campaign_id=row.campaign_id,
                        route=row.route,
                        imsi=row.imsi,
                        msisdn=row.msisdn,
                        sender=row.sender,
                        text=row.text,
                        scheduled_at=row.scheduled_at,
                        deadline=row.deadline_at - row.scheduled_at,
                        error=row.error,
                    )
                )
            await conn.commit()
        for row in skipped:
            bind(log, route=row.route, test_id=row.id).info(
                "campaign %s: test to probe %s skipped at send time: %s",
                row.campaign_id,
                row.imsi,
                report.skipped[row.id],
            )
        await asyncio.gather(*(self._submit(claim, now, report) for claim in claims))
        return report

    async def _submit(self, claim: _Claim, now: datetime, report: DispatchReport) -> None:
        clog = bind(log, route=claim.route, test_id=claim.id)
        request = SubmitRequest(
            test_case_id=claim.id,
            route=claim.route,
            msisdn=claim.msisdn,
            sender=claim.sender,
            text=claim.text,
        )
        async with self._slots:
            try:
                submitted = await asyncio.wait_for(
                    self._submitter.submit(request), timeout=self._config.submit_timeout_s
                )
            except SubmitError as exc:
                await self._refused(claim, exc, now, report)
                return
            except TimeoutError:
                reason = f"submit timed out after {self._config.submit_timeout_s:g} s: outcome unknown"
            except Exception as exc:
                clog.exception(
                    "campaign %s: the sender failed on the submit to probe %s", claim.campaign_id, claim.imsi
                )
                reason = f"sender error ({type(exc).__name__}: {exc}): outcome unknown"
            else:
                await self._submitted(claim, submitted, report)
                return
        # It may have gone out and been charged: the price stays counted against the budgets.
        await self._finish(claim, {"status": "failed", "error": reason})
        report.failed[claim.id] = reason
        clog.warning("campaign %s: test to probe %s failed: %s", claim.campaign_id, claim.imsi, reason)

    async def _submitted(self, claim: _Claim, submitted: Submitted, report: DispatchReport) -> None:
        ok = await self._finish(
            claim,
            {
                "status": "submitted",
                "message_id": submitted.message_id,
                "submitted_at": submitted.submitted_at,
                "submit_acked_at": submitted.acked_at,
                "deadline_at": submitted.submitted_at + claim.deadline,
            },
        )
        if not ok:
            return
        report.submitted.append(claim.id)
        bind(log, route=claim.route, test_id=claim.id).info(
            "campaign %s: test submitted to probe %s, message id %s",
            claim.campaign_id,
            claim.imsi,
            submitted.message_id,
        )

    async def _refused(self, claim: _Claim, exc: SubmitError, now: datetime, report: DispatchReport) -> None:
        clog = bind(log, route=claim.route, test_id=claim.id)
        retry_at = await self._retry_time(claim, now) if exc.retryable else None
        if retry_at is not None:
            await self._finish(
                claim,
                {
                    "status": "scheduled",
                    "scheduled_at": retry_at,
                    "deadline_at": retry_at + claim.deadline,
                    "submitted_at": None,
                    "error": f"retried after: {exc.reason}",
                },
            )
            report.retrying[claim.id] = retry_at
            clog.info(
                "campaign %s: submit to probe %s refused (%s), trying again at %s",
                claim.campaign_id,
                claim.imsi,
                exc.reason,
                retry_at.isoformat(),
            )
            return
        # A refused submit is not charged: price 0, nothing counted against the budgets.
        await self._finish(claim, {"status": "failed", "error": exc.reason, "price": 0.0})
        report.failed[claim.id] = exc.reason
        clog.warning("campaign %s: submit to probe %s refused: %s", claim.campaign_id, claim.imsi, exc.reason)

    async def _retry_time(self, claim: _Claim, now: datetime) -> datetime | None:
        """When to try a retryable refusal again, or None: only once, within the cadence, the
        allowed hours and the UTC day its price was budgeted on."""
        if claim.error is not None or claim.campaign_id is None:
            return None
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(s.campaigns.c.definition, s.campaigns.c.paused).where(
                        s.campaigns.c.id == claim.campaign_id
                    )
                )
            ).one_or_none()
        if row is None or row.paused:
            return None
        try:
            definition = CampaignDefinition.model_validate(row.definition)
        except ValidationError:
            return None
        retry_at = now + timedelta(seconds=self._config.retry_after_s)
        if retry_at >= claim.scheduled_at + timedelta(seconds=definition.cadence_s):
            return None
        if _utc_day(retry_at)[0] != _utc_day(claim.scheduled_at)[0]:
            return None
        return retry_at if in_allowed_hours(definition, retry_at) else None

    async def _finish(self, claim: _Claim, values: dict[str, Any]) -> bool:
        """Write the outcome of a claimed test; False if it was no longer ours."""
        tc = s.test_cases
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(tc).where(and_(tc.c.id == claim.id, tc.c.status == "submitting")).values(**values)
            )
            if result.rowcount != 1 and values["status"] == "submitted":
                # Delivered before the route acknowledged the submit (ingest already made it done):
                # keep the submit's message id and times, for its receipts, without undoing that.
                others = {k: v for k, v in values.items() if k != "status"}
                result = await conn.execute(
                    update(tc).where(and_(tc.c.id == claim.id, tc.c.status == "done")).values(**others)
                )
        if result.rowcount != 1:
            bind(log, route=claim.route, test_id=claim.id).warning(
                "test left 'submitting' before its outcome (%s) was written", values["status"]
            )
            return False
        return True

    async def _recover_interrupted(self) -> None:
        """At start: fail, outcome unknown, the tests a stopped controller left in ``submitting``
        (they may have been sent: their price stays counted). With a heartbeat, only those of
        instances that are gone, of this instance's own id (a previous life) and those whose claim
        names no instance (written before claims did); without one, all of them."""
        tc = s.test_cases
        now = datetime.now(UTC)
        where: ColumnElement[bool] | None = None
        if self._heartbeat is not None:
            where = (
                tc.c.claimed_by.is_(None)
                | (tc.c.claimed_by == self.instance)
                | gone(tc.c.claimed_by, now, self._heartbeat.max_clock_skew_s)
            )
        await fail_submitting(
            self._engine, where, f"left in flight, found by instance {self.instance} at its start"
        )


async def _begin_write(conn: AsyncConnection) -> None:
    """Start a write transaction that holds SQLite's write lock from its first statement, so its
    reads and writes are one consistent step; PostgreSQL locks rows as it goes."""
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = [
    "JOB_FUNCTION",
    "DispatchReport",
    "Planned",
    "RoundPlan",
    "Scheduler",
    "Skip",
    "SyncReport",
    "in_allowed_hours",
    "probe_problem",
    "run_campaign_round",
    "spread",
]
