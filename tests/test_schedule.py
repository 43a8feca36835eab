"""The scheduler on both databases (SQLite file, PostgreSQL): rounds of route x target test cases
spread over the cadence, offline probes skipped at no cost, daily budgets that concurrent rounds
cannot overspend, allowed hours in the campaign's time zone, campaign jobs persisted across a
restart and kept in step with the campaigns table, and the dispatch that submits each test once.

The ``Submitter`` here is ``RecordingSubmitter``, a stand-in that records every request and
answers from a script: the real one is the bundled sender, built in a later issue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.campaigns import CampaignDefinition
from controller.config import ControllerConfig, ScheduleConfig
from controller.correlation import Token, find_tokens, render
from controller.job_store import sync_url
from controller.schedule import (
    RoundPlan,
    Scheduler,
    SyncReport,
    in_allowed_hours,
    run_campaign_round,
    spread,
)
from controller.storage import schema as s
from controller.storage.db import open_database
from controller.submit import SubmitError, SubmitRequest, Submitted

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
FR, DE = "20801", "26201"
PRICE = 0.05


class RecordingSubmitter:
    """Records every request; answers from ``script`` (a SubmitError to raise, or ``"hang"``),
    else accepts with a message id, ``delay_s`` after ``at`` (default: the real time)."""

    def __init__(self) -> None:
        self.requests: list[SubmitRequest] = []
        self.script: list[SubmitError | str] = []
        self.at: datetime | None = None

    async def submit(self, request: SubmitRequest) -> Submitted:
        self.requests.append(request)
        await asyncio.sleep(0.01)  # concurrent dispatchers get every chance to interleave
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, SubmitError):
            raise outcome
        if outcome == "hang":
            await asyncio.sleep(3600)
        sent = self.at or datetime.now(UTC)
        return Submitted(
            message_id=f"m-{request.test_case_id}-{len(self.requests)}",
            submitted_at=sent,
            acked_at=sent + timedelta(milliseconds=40),
        )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = await open_database(database_url)
    yield eng
    await eng.dispose()


def make_scheduler(
    engine: AsyncEngine, url: str, submitter: RecordingSubmitter | None = None, **config: Any
) -> Scheduler:
    return Scheduler(
        engine, ScheduleConfig(**config), submitter or RecordingSubmitter(), url, rng=random.Random(7)
    )


def probe(
    imsi: str,
    mcc_mnc: str = FR,
    *,
    agent: str = "pi-1",
    connected: bool = True,
    registration: str = "registered_home",
) -> dict[str, Any]:
    return {
        "imsi": imsi,
        "msisdn": "+33" + imsi[-9:],
        "mcc_mnc": mcc_mnc,
        "agent_id": agent,
        "modem_id": f"modem-{imsi[-2:]}",
        "connected": connected,
        "registration": registration,
        "updated_at": NOW,
    }


async def seed(
    engine: AsyncEngine,
    probes: list[dict[str, Any]],
    routes: dict[str, dict[str, float]],
    disabled: tuple[str, ...] = (),
) -> None:
    """Agents pi-1 (online) and pi-off (offline), the probes, and routes with their prices."""
    async with engine.begin() as conn:
        await conn.execute(
            s.agents.insert(),
            [
                {"id": "pi-1", "state": "online", "status_at": NOW, "last_seen_at": NOW},
                {"id": "pi-off", "state": "offline", "status_at": NOW, "last_seen_at": NOW},
            ],
        )
        if probes:
            await conn.execute(s.probes.insert(), probes)
        await conn.execute(
            s.routes.insert(),
            [
                {"name": name, "connector": {}, "prices": prices, "enabled": name not in disabled}
                for name, prices in routes.items()
            ],
        )


async def add_campaign(engine: AsyncEngine, name: str = "c1", paused: bool = False, **definition: Any) -> int:
    document = CampaignDefinition.model_validate(definition).model_dump(mode="json")
    async with engine.begin() as conn:
        result = await conn.execute(
            s.campaigns.insert().returning(s.campaigns.c.id),
            [{"name": name, "definition": document, "paused": paused, "created_at": NOW, "updated_at": NOW}],
        )
        campaign_id: int = result.scalar_one()
    return campaign_id


async def cases(engine: AsyncEngine, **where: Any) -> list[Any]:
    query = select(s.test_cases).order_by(s.test_cases.c.scheduled_at, s.test_cases.c.id)
    for column, value in where.items():
        query = query.where(s.test_cases.c[column] == value)
    async with engine.connect() as conn:
        return list((await conn.execute(query)).all())


async def set_status(engine: AsyncEngine, status: str, **where: Any) -> None:
    statement = update(s.test_cases).values(status=status)
    for column, value in where.items():
        statement = statement.where(s.test_cases.c[column] == value)
    async with engine.begin() as conn:
        await conn.execute(statement)


def reasons(plan: RoundPlan) -> dict[tuple[str, str], str]:
    return {(skip.route, skip.target): skip.reason for skip in plan.skipped}


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////var/lib/pf/x.db", "sqlite:////var/lib/pf/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///x.db"),
        ("x.db", "sqlite:///x.db"),
        ("postgresql://u:p@db:5432/pf", "postgresql+psycopg://u:p@db:5432/pf"),
        ("postgres://u@db/pf", "postgresql+psycopg://u@db/pf"),
        ("postgresql+asyncpg://u@db/pf", "postgresql+psycopg://u@db/pf"),
    ],
)
def test_sync_url_for_the_job_store(given: str, expected: str) -> None:
    assert sync_url(given) == expected


def test_jitter_moves_sends_but_keeps_each_probe_half_a_gap_apart() -> None:
    cadence_s, n_routes, n_targets = 600.0, 3, 4
    gap_s = cadence_s / n_routes
    exact = spread(NOW, cadence_s, n_routes, n_targets, 0.0, random.Random(1))
    jittered = spread(NOW, cadence_s, n_routes, n_targets, 1000.0, random.Random(1))
    for t in range(n_targets):
        column = [exact[r][t] for r in range(n_routes)]
        assert [(b - a).total_seconds() for a, b in itertools.pairwise(column)] == [gap_s] * 2
        moved = sorted(jittered[r][t] for r in range(n_routes))
        assert all((b - a).total_seconds() >= gap_s / 2 for a, b in itertools.pairwise(moved))
    flat = [at for row in jittered for at in row]
    assert min(flat) >= NOW
    assert flat != [at for row in exact for at in row]  # the jitter did move them
    assert max(
        abs((j - e).total_seconds()) for j, e in zip(flat, [a for r in exact for a in r], strict=True)
    ) <= (gap_s / 4)


def test_allowed_hours_past_midnight_in_the_campaign_zone() -> None:
    night = CampaignDefinition.model_validate(
        {
            "routes": ["r"],
            "networks": [FR],
            "cadence_s": 600,
            "timezone": "America/New_York",
            "allowed_hours": [{"start": "22:00", "end": "06:00"}],
        }
    )
    # 07:00 UTC is 02:00 in New York (inside); 02:00 UTC is 21:00 the evening before (outside).
    assert in_allowed_hours(night, datetime(2026, 1, 15, 7, 0, tzinfo=UTC))
    assert not in_allowed_hours(night, datetime(2026, 1, 16, 2, 0, tzinfo=UTC))
    assert in_allowed_hours(night, datetime(2026, 1, 16, 3, 0, tzinfo=UTC))  # 22:00 local
    assert not in_allowed_hours(night, datetime(2026, 1, 15, 11, 0, tzinfo=UTC))  # 06:00: the end


def test_config_has_a_schedule_section_with_a_ten_minute_deadline() -> None:
    config = ControllerConfig.model_validate({"broker": {"host": "localhost"}})
    assert config.schedule.deadline_s == 600.0
    with pytest.raises(ValueError, match=r"schedule\.dispatch_interval_s"):
        ControllerConfig.model_validate({"broker": {"host": "h"}, "schedule": {"dispatch_interval_s": 0}})


async def test_a_due_job_without_its_scheduler_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    await run_campaign_round("no-such-scheduler", 1)
    assert "no scheduler runs for its database" in caplog.text


# --- rounds ------------------------------------------------------------------------------------


async def test_round_creates_route_by_network_cases_spread_over_the_cadence(
    engine: AsyncEngine, database_url: str
) -> None:
    await seed(
        engine,
        [probe("208010000000001", FR), probe("262010000000001", DE)],
        {"r1": {FR: 0.04, DE: 0.07}, "r2": {FR: 0.05, DE: 0.06}},
    )
    cid = await add_campaign(
        engine, routes=["r1", "r2"], networks=[FR, DE], cadence_s=600, templates=["otp", "unicode"]
    )
    scheduler = make_scheduler(engine, database_url)

    plan = await scheduler.plan_round(cid, NOW)

    assert plan.skipped == [] and plan.reason is None
    rows = await cases(engine, campaign_id=cid)
    assert {(r.route, r.mcc_mnc) for r in rows} == {("r1", FR), ("r1", DE), ("r2", FR), ("r2", DE)}
    assert [(r.scheduled_at - NOW).total_seconds() for r in rows] == [0, 150, 300, 450]
    for imsi in ("208010000000001", "262010000000001"):
        times = [r.scheduled_at for r in rows if r.imsi == imsi]
        assert (times[1] - times[0]).total_seconds() == 300  # cadence / routes: no burst
    prices = {("r1", FR): 0.04, ("r1", DE): 0.07, ("r2", FR): 0.05, ("r2", DE): 0.06}
    for row in rows:
        assert row.status == "scheduled"
        assert row.template == "otp"
        assert row.text == render(Token.parse(row.token), "otp")
        assert find_tokens(row.text) == [Token.parse(row.token)]
        assert row.deadline_at - row.scheduled_at == timedelta(minutes=10)
        assert row.price == prices[row.route, row.mcc_mnc]
        assert row.sender == "ProbeFleet" and row.msisdn.startswith("+33")
    assert len({r.token for r in rows}) == 4

    # The next round takes the next template, for every pair alike.
    await set_status(engine, "submitted", campaign_id=cid)
    second = await scheduler.plan_round(cid, NOW + timedelta(seconds=600))
    assert {p.template for p in second.created} == {"unicode"}
    assert all(
        p.text == render(Token.parse(p.token), "unicode")
        for p in await cases(engine, campaign_id=cid, template="unicode")
    )


async def test_network_probes_rotate_least_recently_tested_first(
    engine: AsyncEngine, database_url: str
) -> None:
    await seed(
        engine,
        [
            probe("208010000000001"),
            probe("208010000000002"),
            probe("208010000000003", agent="pi-off"),  # never chosen: its agent is offline
        ],
        {"r1": {FR: PRICE}},
    )
    cid = await add_campaign(engine, routes=["r1"], networks=[FR], cadence_s=60)
    scheduler = make_scheduler(engine, database_url)
    chosen = []
    for i in range(4):
        plan = await scheduler.plan_round(cid, NOW + timedelta(seconds=60 * i))
        chosen += [p.imsi for p in plan.created]
        await set_status(engine, "submitted", campaign_id=cid)
    assert chosen == ["208010000000001", "208010000000002"] * 2


async def test_offline_or_unregistered_probes_are_skipped_and_cost_nothing(
    engine: AsyncEngine, database_url: str
) -> None:
    await seed(
        engine,
        [
            probe("208010000000001", agent="pi-off"),
            probe("208010000000002", connected=False),
            probe("208010000000003", registration="searching"),
            probe("208010000000004"),
            probe("262010000000001", DE, registration="denied"),
        ],
        {"r1": {FR: PRICE, DE: PRICE}},
    )
    imsis = ["208010000000001", "208010000000002", "208010000000003", "208010000000004", "208019999999999"]
    # A budget for exactly one test: had the skipped probes been counted, the last would not fit.
    cid = await add_campaign(
        engine, routes=["r1"], probes=imsis, networks=[DE], cadence_s=600, daily_budget_per_route=PRICE
    )
    plan = await make_scheduler(engine, database_url).plan_round(cid, NOW)

    assert [p.imsi for p in plan.created] == ["208010000000004"]
    assert reasons(plan) == {
        ("r1", "probe 208010000000001"): "probe offline (agent offline)",
        ("r1", "probe 208010000000002"): "probe offline (modem not connected)",
        ("r1", "probe 208010000000003"): "probe not registered (searching)",
        ("r1", "probe 208019999999999"): "unknown probe",
        ("r1", f"network {DE}"): f"no online, registered probe in network {DE}",
    }
    rows = await cases(engine)
    assert [r.imsi for r in rows] == ["208010000000004"]  # no row, no price for the skipped ones


async def test_paused_or_unknown_campaign_plans_nothing(engine: AsyncEngine, database_url: str) -> None:
    await seed(engine, [probe("208010000000001")], {"r1": {FR: PRICE}})
    cid = await add_campaign(engine, paused=True, routes=["r1"], networks=[FR], cadence_s=600)
    scheduler = make_scheduler(engine, database_url)
    assert (await scheduler.plan_round(cid, NOW)).reason == "campaign paused"
    assert (await scheduler.plan_round(cid + 1, NOW)).reason == "campaign not found"
    assert await cases(engine) == []


async def test_route_disabled_or_unknown_is_skipped(engine: AsyncEngine, database_url: str) -> None:
    await seed(engine, [probe("208010000000001")], {"r1": {FR: PRICE}, "r2": {FR: PRICE}}, disabled=("r2",))
    cid = await add_campaign(engine, routes=["r1", "r2", "r3"], networks=[FR], cadence_s=600)
    plan = await make_scheduler(engine, database_url).plan_round(cid, NOW)
    assert [p.route for p in plan.created] == ["r1"]
    assert reasons(plan) == {
        ("r2", f"network {FR}"): "route disabled",
        ("r3", f"network {FR}"): "unknown route",
    }


async def test_allowed_hours_in_a_non_utc_zone_with_a_window_past_midnight(
    engine: AsyncEngine, database_url: str
) -> None:
    await seed(engine, [probe("208010000000001")], {"r1": {FR: PRICE}, "r2": {FR: PRICE}})
    cid = await add_campaign(
        engine,
        routes=["r1", "r2"],
        networks=[FR],
        cadence_s=600,
        timezone="America/New_York",
        allowed_hours=[{"start": "22:00", "end": "06:00"}],
    )
    scheduler = make_scheduler(engine, database_url)

    night = await scheduler.plan_round(cid, datetime(2026, 1, 15, 7, 0, tzinfo=UTC))  # 02:00 local
    assert len(night.created) == 2 and night.skipped == []

    # 05:55 local: the first send (05:55) is inside, the second (06:00) is not.
    dawn = datetime(2026, 1, 15, 10, 55, tzinfo=UTC)
    edge = await scheduler.plan_round(cid, dawn)
    assert [p.scheduled_at for p in edge.created] == [dawn]
    assert [skip.reason for skip in edge.skipped] == ["outside allowed hours (America/New_York)"]

    # 21:00 local, though 02:00 UTC is inside the window read as UTC.
    evening = await scheduler.plan_round(cid, datetime(2026, 1, 16, 2, 0, tzinfo=UTC))
    assert evening.created == [] and len(evening.skipped) == 2
    assert len(await cases(engine, campaign_id=cid)) == 3


# --- budgets -----------------------------------------------------------------------------------


async def test_daily_budget_per_route_is_never_exceeded(engine: AsyncEngine, database_url: str) -> None:
    await seed(engine, [probe("208010000000001")], {"r1": {FR: PRICE}})
    cid = await add_campaign(
        engine, routes=["r1"], networks=[FR], cadence_s=3600, daily_budget_per_route=2 * PRICE
    )
    scheduler = make_scheduler(engine, database_url)
    created = []
    for hour in range(4):
        plan = await scheduler.plan_round(cid, NOW + timedelta(hours=hour))
        created.append(len(plan.created))
        await set_status(engine, "submitted", campaign_id=cid)
    assert created == [1, 1, 0, 0]
    assert reasons(plan) == {("r1", f"network {FR}"): "daily budget of the route reached (0.1 spent of 0.1)"}
    spent = sum(r.price for r in await cases(engine, campaign_id=cid))
    assert spent == pytest.approx(2 * PRICE)

    # A new UTC day, a new budget.
    tomorrow = datetime(2026, 3, 11, 0, 5, tzinfo=UTC)
    assert len((await scheduler.plan_round(cid, tomorrow)).created) == 1


async def test_daily_budget_per_network_and_unknown_prices(engine: AsyncEngine, database_url: str) -> None:
    await seed(
        engine,
        [probe("208010000000001"), probe("262010000000001", DE)],
        {"r1": {FR: PRICE, DE: PRICE}, "r2": {FR: PRICE}, "r3": {}},
    )
    budgeted = await add_campaign(
        engine, "budgeted", routes=["r1", "r2", "r3"], networks=[FR, DE], cadence_s=600,
        daily_budget_per_network=PRICE,
    )  # fmt: skip
    plan = await make_scheduler(engine, database_url).plan_round(budgeted, NOW)
    rows = await cases(engine, campaign_id=budgeted)
    assert [r.mcc_mnc for r in rows if r.mcc_mnc == FR] == [FR]  # one of r1 / r2 only
    assert sum(r.price for r in rows if r.mcc_mnc == FR) <= PRICE
    why = reasons(plan)
    assert why[("r3", f"network {FR}")].startswith("price unknown")
    assert why[("r2", f"network {DE}")].startswith("price unknown")
    assert f"daily budget of the network {FR} reached (0.05 spent of 0.05)" in why.values()

    # Without a budget an unknown price is no reason to skip.
    free = await add_campaign(engine, "free", routes=["r3"], probes=["262010000000001"], cadence_s=600)
    plan = await make_scheduler(engine, database_url).plan_round(free, NOW)
    assert [(p.route, p.price) for p in plan.created] == [("r3", None)]


async def test_concurrent_rounds_never_overspend(engine: AsyncEngine, database_url: str) -> None:
    imsis = [f"20801000000000{i}" for i in range(6)]
    await seed(engine, [probe(imsi) for imsi in imsis], {"r1": {FR: PRICE}})
    cid = await add_campaign(
        engine, routes=["r1"], networks=[FR], cadence_s=600, daily_budget_per_route=2 * PRICE
    )
    # Each round picks the least recently tested probe, so without the per-campaign lock the
    # rounds would all read an unspent budget and write a test each.
    schedulers = [make_scheduler(engine, database_url) for _ in range(6)]
    plans = await asyncio.gather(*(sch.plan_round(cid, NOW) for sch in schedulers))

    rows = await cases(engine, campaign_id=cid)
    assert len(rows) == 2 and len({r.imsi for r in rows}) == 2
    assert sum(r.price for r in rows) == pytest.approx(2 * PRICE)
    assert sum(len(p.created) for p in plans) == 2
    assert sum(skip.reason.startswith("daily budget of the route") for p in plans for skip in p.skipped) == 4


# --- campaign jobs -----------------------------------------------------------------------------


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_campaign_jobs_persist_across_a_restart(engine: AsyncEngine, database_url: str) -> None:
    await seed(engine, [probe("208010000000001")], {"r1": {FR: PRICE}})
    cid = await add_campaign(engine, routes=["r1"], networks=[FR], cadence_s=3600)
    submitter = RecordingSubmitter()
    first = make_scheduler(engine, database_url, submitter, dispatch_interval_s=0.05)
    started = datetime.now(UTC)
    await first.start()
    try:
        # The new campaign's first round runs at once, through the persisted job and the
        # registry; the dispatch loop then submits its test, due at once.
        await wait_for(lambda: _has_cases(engine, cid))
        await wait_for(lambda: _next_run_after(first, cid, started + timedelta(seconds=1800)))
        await wait_for(lambda: _status_is(engine, cid, "submitted"))
        next_run = (await first.next_runs())[cid]
        assert next_run is not None
    finally:
        await first.stop()
    assert [r.test_case_id for r in submitter.requests] == [r.id for r in await cases(engine)]
    async with engine.connect() as conn:
        stored = (await conn.execute(select(s.scheduler_jobs.c.id, s.scheduler_jobs.c.next_run_time))).all()
    assert [row.id for row in stored] == [f"campaign:{cid}"]
    assert stored[0].next_run_time == pytest.approx(next_run.timestamp(), abs=1e-3)

    # A test left in flight by a stopped controller is failed, outcome unknown, at the next start.
    await set_status(engine, "submitting", campaign_id=cid)
    second = make_scheduler(engine, database_url, RecordingSubmitter())
    await second.start()
    try:
        restored = (await second.next_runs())[cid]
        assert restored is not None
        assert abs((restored - next_run).total_seconds()) < 1e-3  # the persisted time, not a new one
        await asyncio.sleep(0.3)
        assert len(await cases(engine, campaign_id=cid)) == 1  # no new round at restart
        (row,) = await cases(engine, campaign_id=cid)
        assert row.status == "failed" and "outcome unknown" in row.error
    finally:
        await second.stop()


async def test_sync_follows_campaign_changes(engine: AsyncEngine, database_url: str) -> None:
    active = await add_campaign(engine, "active", routes=["r1"], networks=[FR], cadence_s=600)
    paused = await add_campaign(engine, "paused", paused=True, routes=["r1"], networks=[FR], cadence_s=600)
    async with engine.begin() as conn:  # written by an older version, say: never scheduled
        await conn.execute(
            s.campaigns.insert(),
            [
                {
                    "name": "broken",
                    "definition": {"routes": []},
                    "paused": False,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
            ],
        )
    scheduler = make_scheduler(engine, database_url, sync_interval_s=3600)
    await scheduler.start()
    try:
        assert set(await scheduler.next_runs()) == {active}

        changed = CampaignDefinition(routes=["r1"], networks=[FR], cadence_s=7200).model_dump(mode="json")
        async with engine.begin() as conn:
            await conn.execute(
                update(s.campaigns).where(s.campaigns.c.id == active).values(definition=changed)
            )
            await conn.execute(update(s.campaigns).where(s.campaigns.c.id == paused).values(paused=False))
        report = await scheduler.sync_campaigns()
        assert (report.added, report.changed, report.removed) == ([paused], [active], [])
        next_run = (await scheduler.next_runs())[active]
        assert next_run is not None
        assert 7100 < (next_run - datetime.now(UTC)).total_seconds() <= 7200

        async with engine.begin() as conn:
            await conn.execute(update(s.campaigns).where(s.campaigns.c.id == active).values(paused=True))
            await conn.execute(delete(s.campaigns).where(s.campaigns.c.id == paused))
        report = await scheduler.sync_campaigns()
        assert sorted(report.removed) == sorted([active, paused])
        assert await scheduler.next_runs() == {}
        assert (await scheduler.sync_campaigns()).removed == []  # nothing left to do
    finally:
        await scheduler.stop()


async def test_a_disabled_scheduler_schedules_nothing(engine: AsyncEngine, database_url: str) -> None:
    await add_campaign(engine, routes=["r1"], networks=[FR], cadence_s=600)
    scheduler = make_scheduler(engine, database_url, enabled=False)
    await scheduler.start()
    try:
        assert await scheduler.sync_campaigns() == SyncReport()
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(s.scheduler_jobs))).scalar_one() == 0
    finally:
        await scheduler.stop()


async def _has_cases(engine: AsyncEngine, cid: int) -> bool:
    return bool(await cases(engine, campaign_id=cid))


async def _next_run_after(scheduler: Scheduler, cid: int, after: datetime) -> bool:
    next_run = (await scheduler.next_runs()).get(cid)
    return next_run is not None and next_run > after


async def _status_is(engine: AsyncEngine, cid: int, status: str) -> bool:
    rows = await cases(engine, campaign_id=cid)
    return bool(rows) and all(r.status == status for r in rows)


# --- dispatch ----------------------------------------------------------------------------------


async def planned(engine: AsyncEngine, n_probes: int = 1, **definition: Any) -> int:
    await seed(engine, [probe(f"20801000000000{i}") for i in range(n_probes)], {"r1": {FR: PRICE}})
    definition = {"routes": ["r1"], "probes": [f"20801000000000{i}" for i in range(n_probes)]} | definition
    return await add_campaign(engine, cadence_s=600, **definition)


async def test_dispatch_submits_each_due_test_once(engine: AsyncEngine, database_url: str) -> None:
    cid = await planned(engine, n_probes=4, deadline_s=120)
    submitter = RecordingSubmitter()
    submitter.at = NOW + timedelta(seconds=500)
    schedulers = [make_scheduler(engine, database_url, submitter, late_submit_s=3600) for _ in range(3)]
    await schedulers[0].plan_round(cid, NOW)

    early = await schedulers[0].dispatch_due(NOW + timedelta(seconds=100))  # only the first is due
    assert len(early.submitted) == 1
    reports = await asyncio.gather(*(sch.dispatch_due(NOW + timedelta(seconds=500)) for sch in schedulers))

    rows = await cases(engine, campaign_id=cid)
    assert sorted(r.test_case_id for r in submitter.requests) == sorted(r.id for r in rows)
    assert sorted(sum((rep.submitted for rep in reports), early.submitted)) == sorted(r.id for r in rows)
    for row, request in zip(rows, sorted(submitter.requests, key=lambda r: r.test_case_id), strict=True):
        assert (request.route, request.msisdn, request.sender, request.text) == (
            row.route, row.msisdn, row.sender, row.text,
        )  # fmt: skip
        assert row.status == "submitted"
        assert row.message_id.startswith(f"m-{row.id}-")
        assert row.submitted_at == submitter.at
        assert row.submit_acked_at == submitter.at + timedelta(milliseconds=40)
        assert row.deadline_at == submitter.at + timedelta(seconds=120)  # from the submit, not the plan


async def test_dispatch_rechecks_the_probe_and_skips_missed_tests(
    engine: AsyncEngine, database_url: str
) -> None:
    cid = await planned(engine, n_probes=2)
    submitter = RecordingSubmitter()
    scheduler = make_scheduler(engine, database_url, submitter, late_submit_s=60)
    await scheduler.plan_round(cid, NOW)
    first, second = await cases(engine, campaign_id=cid)
    async with engine.begin() as conn:  # the first probe's SIM lost its network meanwhile
        await conn.execute(
            update(s.probes).where(s.probes.c.imsi == first.imsi).values(registration="searching")
        )

    report = await scheduler.dispatch_due(NOW + timedelta(seconds=5))
    assert report.skipped == {first.id: "probe not registered (searching)"}
    # The second test was due at +300 s: at +400 s, 100 s late, it is skipped, not sent late.
    report = await scheduler.dispatch_due(NOW + timedelta(seconds=400))
    assert report.skipped == {second.id: "missed its send time by 100 s (controller stopped?)"}
    assert submitter.requests == []
    for row in await cases(engine, campaign_id=cid):
        assert (row.status, row.price) == ("skipped", 0.0)
        assert row.error == report.skipped.get(row.id, "probe not registered (searching)")


async def test_submit_errors_retry_once_then_fail(engine: AsyncEngine, database_url: str) -> None:
    cid = await planned(engine, n_probes=3)
    submitter = RecordingSubmitter()
    scheduler = make_scheduler(engine, database_url, submitter, late_submit_s=3600, retry_after_s=30)
    await scheduler.plan_round(cid, NOW)
    a, b, c = await cases(engine, campaign_id=cid)

    submitter.script = [SubmitError("throttled", retryable=True)]
    report = await scheduler.dispatch_due(NOW + timedelta(seconds=1))
    retry_at = NOW + timedelta(seconds=31)
    assert report.retrying == {a.id: retry_at}
    row = (await cases(engine, id=a.id))[0]
    assert (row.status, row.scheduled_at, row.error) == ("scheduled", retry_at, "retried after: throttled")
    assert row.deadline_at == retry_at + timedelta(minutes=10)

    submitter.script = [SubmitError("throttled again", retryable=True)]  # the retry fails too
    report = await scheduler.dispatch_due(retry_at)
    assert report.failed == {a.id: "throttled again"} and report.retrying == {}

    submitter.script = [SubmitError("invalid destination", retryable=False)]
    report = await scheduler.dispatch_due(NOW + timedelta(seconds=200))
    assert report.failed == {b.id: "invalid destination"}

    # A retry that would come after the pair's next test (planned +400 s, cadence 600 s, so at
    # +1000 s) is not made.
    submitter.script = [SubmitError("throttled", retryable=True)]
    report = await scheduler.dispatch_due(NOW + timedelta(seconds=980))
    assert report.failed == {c.id: "throttled"} and report.retrying == {}

    rows = await cases(engine, campaign_id=cid)
    assert [(r.status, r.price) for r in rows] == [("failed", 0.0)] * 3  # refused: nothing spent
    assert [r.test_case_id for r in submitter.requests] == [a.id, a.id, b.id, c.id]


async def test_a_submit_with_unknown_outcome_fails_and_keeps_its_price(
    engine: AsyncEngine, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cid = await planned(engine)
    submitter = RecordingSubmitter()
    scheduler = make_scheduler(engine, database_url, submitter, submit_timeout_s=0.2)
    await scheduler.plan_round(cid, NOW)
    submitter.script = ["hang"]
    report = await scheduler.dispatch_due(NOW)
    (row,) = await cases(engine, campaign_id=cid)
    assert report.failed == {row.id: "submit timed out after 0.2 s: outcome unknown"}
    assert (row.status, row.price) == ("failed", PRICE)  # it may have been charged
    assert any(r.levelno == logging.WARNING and "failed" in r.getMessage() for r in caplog.records)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(s.test_cases))).scalar_one() == 1
