"""Leader election on both databases (SQLite file, PostgreSQL), each instance on its own engine as
separate processes would be: exactly one of several instances leads and only it runs its duties;
a clean stop hands over within one renew interval, a dead leader is replaced after the ttl and not
before, a failed renewal steps the leader down at once; contenders starting together elect one;
a round's fence keeps the lease until its transaction ends. Then two whole controllers (``serve``)
on one database with one campaign: each round is planned once, by the leader, and the new leader
picks the campaign's job up after a handover."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import ControllerConfig, LeaderConfig, ScheduleConfig
from controller.leader import Leader, instance_id
from controller.schedule import RoundPlan, Scheduler
from controller.service import serve
from controller.storage import schema as s
from controller.storage.db import make_engine, open_database
from tests.mosquitto import Mosquitto, free_port
from tests.test_schedule import RecordingSubmitter, add_campaign, probe, seed

TTL_S = 2.0
RENEW_S = 0.4
SKEW_S = 0.1
#: Slack for the event loop and the database on a busy machine.
SLACK_S = 0.35
IMSI = "208010000000001"
CADENCE_S = 1.0

Make = Callable[..., Leader]


@pytest.fixture
async def make_leader(database_url: str) -> AsyncIterator[Make]:
    """Leaders on one migrated database, each on an engine of its own; stopped after the test."""
    first = await open_database(database_url)
    engines: list[AsyncEngine] = [first]
    leaders: list[Leader] = []

    def make(**settings: Any) -> Leader:
        engine = first if not leaders else make_engine(database_url)
        if engine is not first:
            engines.append(engine)
        settings = {"ttl_s": TTL_S, "renew_interval_s": RENEW_S, "max_clock_skew_s": SKEW_S} | settings
        leader = Leader(engine, **settings)
        leaders.append(leader)
        return leader

    yield make
    for leader in leaders:
        await leader.stop(release=False)
    for engine in engines:
        await engine.dispose()


class Duty:
    """A duty that counts its starts and cancellations."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.running = False
        self.ended = asyncio.Event()

    def __call__(self) -> Coroutine[Any, Any, None]:
        return self._run()

    async def _run(self) -> None:
        self.started += 1
        self.running = True
        try:
            await asyncio.Event().wait()
        finally:
            self.running = False
            self.cancelled += 1
            self.ended.set()


async def lease_row(engine: AsyncEngine) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(s.leases))).one()


async def elected_at(leader: Leader, timeout_s: float) -> datetime:
    await asyncio.wait_for(leader.elected.wait(), timeout_s)
    return datetime.now(UTC)


def test_instance_ids_name_host_and_process_and_differ() -> None:
    a, b = instance_id(), instance_id()
    assert a != b and a.rsplit("-", 2)[1] == b.rsplit("-", 2)[1]  # same pid, other random suffix


def test_the_renew_interval_must_be_below_half_the_ttl() -> None:
    assert LeaderConfig().ttl_s == 30 and LeaderConfig().renew_interval_s == 10
    with pytest.raises(ValueError, match="below half of ttl_s"):
        LeaderConfig(ttl_s=30, renew_interval_s=15)
    with pytest.raises(ValueError, match="max_clock_skew_s"):
        LeaderConfig(ttl_s=30, renew_interval_s=10, max_clock_skew_s=10)
    with pytest.raises(ValueError, match="ttl_s / 2"):
        Leader(None, ttl_s=1.0, renew_interval_s=0.5)  # type: ignore[arg-type]


async def test_of_two_instances_exactly_one_leads_and_runs_the_duties(
    make_leader: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_leader(), make_leader()
    duty_a, duty_b = Duty(), Duty()
    a.add_duty("work", duty_a)
    b.add_duty("work", duty_b)
    await a.start()
    await b.start()
    for _ in range(3):  # and so it stays, renewal after renewal
        assert (a.is_leader, b.is_leader) == (True, False)
        await asyncio.sleep(RENEW_S)
    assert (duty_a.started, duty_a.running, duty_b.started) == (1, True, 0)
    row = await lease_row(a.engine)
    assert (row.name, row.holder) == ("scheduler", a.holder)
    assert row.acquired_at < row.renewed_at < row.expires_at == row.renewed_at + timedelta(seconds=TTL_S)
    async with a.engine.begin() as conn:
        assert await a.holds(conn) is True
    async with b.engine.begin() as conn:
        assert await b.holds(conn) is False
    assert f"instance {a.holder} is now the leader" in caplog.text
    assert f"instance {b.holder} follows the leader {a.holder}" in caplog.text


async def test_a_clean_stop_hands_over_within_one_renew_interval(
    make_leader: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_leader(), make_leader()
    duty_a, duty_b = Duty(), Duty()
    a.add_duty("work", duty_a)
    b.add_duty("work", duty_b)
    await a.start()
    await b.start()
    assert a.is_leader and not b.is_leader
    await a.stop()
    stopped = datetime.now(UTC)
    assert not a.is_leader and (duty_a.running, duty_a.cancelled) == (False, 1)  # stopped before release
    row = await lease_row(b.engine)
    assert row.holder == b.holder or row.expires_at <= stopped  # released (or already taken over)
    taken = await elected_at(b, RENEW_S + SLACK_S)
    assert (taken - stopped).total_seconds() <= RENEW_S + SLACK_S
    await asyncio.sleep(0.05)
    assert duty_b.running and (await lease_row(b.engine)).holder == b.holder
    assert f"instance {a.holder} released the scheduler lease" in caplog.text


async def test_a_dead_leader_is_replaced_after_the_ttl_not_before(make_leader: Make) -> None:
    a, b = make_leader(), make_leader()
    duty_b = Duty()
    b.add_duty("work", duty_b)
    await a.start()
    await b.start()
    await a.stop(release=False)  # the process died: no release, no more renewals
    last = await lease_row(b.engine)
    assert last.holder == a.holder
    expiry = last.renewed_at + timedelta(seconds=TTL_S)
    assert expiry == last.expires_at
    halfway = (expiry - datetime.now(UTC)).total_seconds() - 0.3
    assert halfway > 0
    await asyncio.sleep(halfway)
    assert not b.is_leader and duty_b.started == 0  # the lease still runs: no takeover
    taken = await elected_at(b, TTL_S + RENEW_S + SLACK_S)
    assert taken >= expiry  # not before the ttl
    assert (taken - expiry).total_seconds() <= RENEW_S + SLACK_S  # at the first attempt after it
    await asyncio.sleep(0.05)
    assert duty_b.started == 1 and (await lease_row(b.engine)).holder == b.holder


async def test_a_failed_renewal_steps_down_at_once(
    make_leader: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_leader(), make_leader()
    duty_a = Duty()
    a.add_duty("work", duty_a)
    await a.start()
    await b.start()
    assert a.is_leader
    reachable = a.engine
    a.engine = make_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/gone")  # the database is lost
    try:
        cut = datetime.now(UTC)
        renewed_at = (await lease_row(b.engine)).renewed_at
        await asyncio.wait_for(duty_a.ended.wait(), RENEW_S + SLACK_S + 1.0)
        down = datetime.now(UTC)
        assert not a.is_leader
        assert (down - cut).total_seconds() <= RENEW_S + SLACK_S  # at the next renewal
        assert (down - renewed_at).total_seconds() < TTL_S - SKEW_S  # long before its lease ends
        assert (duty_a.running, duty_a.cancelled) == (False, 1)
        assert "is no longer the leader: renewing the lease failed" in caplog.text
        assert not b.is_leader  # the lease has not expired yet: nobody leads meanwhile
        await elected_at(b, TTL_S + RENEW_S + SLACK_S)
        assert not a.is_leader and duty_a.started == 1
    finally:
        await a.stop(release=False)
        await a.engine.dispose()
        a.engine = reachable


@pytest.mark.parametrize("lease", ["none yet", "expired"])
async def test_contenders_starting_together_elect_exactly_one(make_leader: Make, lease: str) -> None:
    leaders = [make_leader() for _ in range(5)]
    duties = [Duty() for _ in leaders]
    for leader, duty in zip(leaders, duties, strict=True):
        leader.add_duty("work", duty)
    if lease == "expired":  # a dead holder's: every contender's UPDATE may take it, one does
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        async with leaders[0].engine.begin() as conn:
            await conn.execute(
                s.leases.insert().values(
                    name="scheduler",
                    holder="ghost-1-abcdef",
                    acquired_at=long_ago,
                    renewed_at=long_ago,
                    expires_at=long_ago + timedelta(seconds=TTL_S),
                )
            )
    await asyncio.gather(*(leader.start() for leader in leaders))
    winners = [leader for leader in leaders if leader.is_leader]
    assert len(winners) == 1
    for _ in range(int(3 * RENEW_S / 0.05)):  # over three renewals, never two at once
        assert [leader for leader in leaders if leader.is_leader] == winners
        await asyncio.sleep(0.05)
    assert (await lease_row(winners[0].engine)).holder == winners[0].holder
    assert sorted(duty.started for duty in duties) == [0, 0, 0, 0, 1]


async def test_a_fenced_transaction_keeps_the_lease_until_it_ends(make_leader: Make) -> None:
    a, b = make_leader(), make_leader()
    await a.start()
    async with a.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")  # as a round's transaction begins
        assert await a.holds(conn)
        # b sees the lease expired (its clock an hour ahead): its takeover must wait for the commit.
        claim = asyncio.create_task(b._claim(datetime.now(UTC) + timedelta(hours=1)))
        await asyncio.sleep(0.5)
        assert not claim.done()
        await conn.commit()
    held, _ = await asyncio.wait_for(claim, 5.0)
    assert held and (await lease_row(a.engine)).holder == b.holder
    async with a.engine.begin() as conn:
        assert not await a.holds(conn)  # a's next round finds the lease gone


async def test_a_follower_plans_no_round(make_leader: Make, database_url: str) -> None:
    a, b = make_leader(), make_leader()
    await a.start()
    await b.start()
    await seed(a.engine, [probe(IMSI)], {"r1": {"20801": 0.05}})
    cid = await add_campaign(a.engine, routes=["r1"], probes=[IMSI], cadence_s=600)
    config = ScheduleConfig()
    follower = Scheduler(b.engine, config, RecordingSubmitter(), database_url, leader=b)
    plan = await follower.plan_round(cid)
    assert (plan.reason, plan.created, plan.skipped) == ("this controller instance is not the leader", [], [])
    async with b.engine.connect() as conn:
        assert (await conn.execute(select(s.test_cases))).all() == []
    plan = await Scheduler(a.engine, config, RecordingSubmitter(), database_url, leader=a).plan_round(cid)
    assert plan.reason is None and len(plan.created) == 1


# --- two controllers on one database --------------------------------------------------------------


def controller_config(url: str, mosquitto: Mosquitto, name: str) -> ControllerConfig:
    return ControllerConfig.model_validate(
        {
            "database_url": url,
            "broker": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": f"controller-{name}"},
            "api": {"port": free_port()},
            "sender": {"enabled": False},
            "schedule": {"sync_interval_s": 0.2, "dispatch_interval_s": 0.1},
            "leader": {"ttl_s": TTL_S, "renew_interval_s": 0.3, "max_clock_skew_s": SKEW_S},
        }
    )


async def health(config: ControllerConfig) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{config.api.port}/api/v1/health") as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def until_leader(config: ControllerConfig, timeout_s: float) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            body = await health(config)
            if body["leader"]:
                return body
        except aiohttp.ClientError:
            pass  # not listening yet
        assert asyncio.get_running_loop().time() < deadline, "no leader in time"
        await asyncio.sleep(0.05)


async def test_two_controllers_plan_each_round_once(
    database_url: str, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await open_database(database_url)
    await seed(engine, [probe(IMSI)], {"r1": {"20801": 0.05}})
    cid = await add_campaign(engine, routes=["r1"], probes=[IMSI], cadence_s=CADENCE_S)

    rounds: list[tuple[str, RoundPlan]] = []  # (instance, plan) of every round that got the lease
    plan_round = Scheduler.plan_round

    async def recorded(self: Scheduler, campaign_id: int, now: datetime | None = None) -> RoundPlan:
        plan = await plan_round(self, campaign_id, now)
        if plan.reason != "this controller instance is not the leader":
            assert self._leader is not None
            rounds.append((self._leader.holder, plan))
        return plan

    monkeypatch.setattr(Scheduler, "plan_round", recorded)
    configs = [controller_config(database_url, mosquitto, name) for name in ("a", "b")]
    stops = [asyncio.Event(), asyncio.Event()]
    submitters = [RecordingSubmitter(), RecordingSubmitter()]
    serving = [asyncio.create_task(serve(configs[0], stops[0], submitters[0]))]
    try:
        first = await until_leader(configs[0], 15.0)
        serving.append(asyncio.create_task(serve(configs[1], stops[1], submitters[1])))
        await until_leader(configs[0], 1.0)
        second = await health_when_up(configs[1], 15.0)
        assert second["leader"] is False and second["instance"] != first["instance"]
        await asyncio.sleep(3 * CADENCE_S)  # rounds on the first; the second only dispatches

        handover = datetime.now(UTC)
        stops[0].set()
        await asyncio.wait_for(serving[0], 30)
        assert (await until_leader(configs[1], 0.3 + SLACK_S + 0.5))["instance"] == second["instance"]
        await asyncio.sleep(3 * CADENCE_S)  # the new leader picked the campaign's job up
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*serving), 30)

    by_first = [plan for who, plan in rounds if who == first["instance"]]
    by_second = [plan for who, plan in rounds if who == second["instance"]]
    assert len(by_first) >= 3 and len(by_second) >= 2, [(who, p.planned_at) for who, p in rounds]
    assert all(plan.planned_at < handover for plan in by_first)
    assert all(plan.planned_at > handover for plan in by_second)  # a follower never planned one
    times = sorted(plan.planned_at for _, plan in rounds)
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert min(gaps) > CADENCE_S / 2, gaps  # one round per cadence, never a second one beside it
    assert all(len(plan.created) + len(plan.skipped) == 1 for _, plan in rounds)  # its one pair, once

    async with engine.connect() as conn:
        cases = (await conn.execute(select(s.test_cases).where(s.test_cases.c.campaign_id == cid))).all()
    await engine.dispose()
    assert sorted(c.id for c in cases) == sorted(p.test_case_id for _, plan in rounds for p in plan.created)
    submitted = [r.test_case_id for sub in submitters for r in sub.requests]
    assert len(submitted) == len(set(submitted)) >= len(cases) - 1  # each once; the last may be due yet
    assert set(submitted) <= {c.id for c in cases}
    assert submitters[1].requests, "the second instance dispatched too"


async def health_when_up(config: ControllerConfig, timeout_s: float) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await health(config)
        except aiohttp.ClientError:
            assert asyncio.get_running_loop().time() < deadline, "the API did not come up"
            await asyncio.sleep(0.05)
