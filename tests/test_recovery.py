"""Submits cut short, on both databases (SQLite file, PostgreSQL): a test left in ``submitting``
is failed, outcome unknown, only once the controller instance that claimed it is gone. A live
instance's submit survives another instance's start; a dead one's is failed by the leader once
its heartbeat has expired, not before; a restart under the same instance id, and claims from
before claims named their instance, are recovered at start; a clean stop fails its own leftovers
and removes its heartbeat. Then two whole controllers on one database, one of them a separate
process killed with SIGKILL while its submit hangs on a slow HTTP route: the other, the leader
by then, fails that test after the ttl."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import schedule
from controller.config import ScheduleConfig, load
from controller.instances import PRUNE_AFTER, Heartbeat
from controller.recovery import STOPPED_ERROR, recover_orphaned
from controller.schedule import Scheduler
from controller.service import serve
from controller.storage import schema as s
from controller.storage.db import make_engine, open_database
from tests.mosquitto import Mosquitto, free_port
from tests.test_leader import controller_config, health_when_up, until_leader
from tests.test_schedule import RecordingSubmitter, probe, seed

TTL_S = 2.0
RENEW_S = 0.3
SKEW_S = 0.2
#: Slack for the event loop and the database on a busy machine.
SLACK_S = 0.5
IMSI = "208010000000001"

MakeBeat = Callable[[str], Heartbeat]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = await open_database(database_url)
    await seed(eng, [probe(IMSI)], {"r1": {"20801": 0.05}})
    yield eng
    await eng.dispose()


@pytest.fixture
async def make_beat(engine: AsyncEngine, database_url: str) -> AsyncIterator[MakeBeat]:
    """Heartbeats of instances on one database, each on an engine of its own (as separate
    processes); left to expire after the test."""
    beats: list[Heartbeat] = []
    engines: list[AsyncEngine] = []

    def make(instance: str) -> Heartbeat:
        own = make_engine(database_url)
        engines.append(own)
        beat = Heartbeat(own, instance, ttl_s=TTL_S, renew_interval_s=RENEW_S, max_clock_skew_s=SKEW_S)
        beats.append(beat)
        return beat

    yield make
    for beat in beats:
        await beat.stop(release=False)
    for own in engines:
        await own.dispose()


async def in_flight(engine: AsyncEngine, claimed_by: str | None, *, route: str = "r1") -> int:
    """A test in ``submitting``, claimed by ``claimed_by`` (None: before migration 0008)."""
    return await add_case(engine, route=route, status="submitting", claimed_by=claimed_by)


async def due(engine: AsyncEngine, route: str = "r1") -> int:
    """A test due now."""
    return await add_case(engine, route=route, status="scheduled", claimed_by=None)


async def add_case(engine: AsyncEngine, *, route: str, status: str, claimed_by: str | None) -> int:
    at = datetime.now(UTC) - timedelta(seconds=30 if status == "submitting" else 0)
    async with engine.begin() as conn:
        result = await conn.execute(
            s.test_cases.insert().returning(s.test_cases.c.id),
            [
                {
                    "token": os.urandom(8).hex(),
                    "route": route,
                    "imsi": IMSI,
                    "msisdn": "+33" + IMSI[-9:],
                    "mcc_mnc": "20801",
                    "sender": "Probe",
                    "text": "t",
                    "scheduled_at": at,
                    "submitted_at": at if status == "submitting" else None,
                    "deadline_at": at + timedelta(minutes=10),
                    "status": status,
                    "price": 0.05,
                    "claimed_by": claimed_by,
                }
            ],
        )
        test_id: int = result.scalar_one()
    return test_id


async def case(engine: AsyncEngine, test_id: int) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(s.test_cases).where(s.test_cases.c.id == test_id))).one()


async def heartbeat_row(engine: AsyncEngine, instance: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(s.instances).where(s.instances.c.id == instance))).one_or_none()


def scheduler(engine: AsyncEngine, url: str, beat: Heartbeat, **config: Any) -> Scheduler:
    return Scheduler(engine, ScheduleConfig(**config), RecordingSubmitter(), url, heartbeat=beat)


def gone_error(instance: str) -> str:
    return f"controller instance {instance} stopped during the submit: outcome unknown"


async def test_a_live_instances_submit_survives_another_instances_start(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat
) -> None:
    a = make_beat("ctl-a")
    await a.start()
    assert a.alive
    row = await heartbeat_row(engine, "ctl-a")
    assert row.expires_at == row.renewed_at + timedelta(seconds=TTL_S)
    test_id = await in_flight(engine, "ctl-a")
    b = make_beat("ctl-b")
    await b.start()
    second = scheduler(engine, database_url, b)
    await second.start()
    try:
        assert (await case(engine, test_id)).status == "submitting"
        await asyncio.sleep(2 * TTL_S)  # a renews all along: neither b nor its leader pass fails it
        assert await recover_orphaned(engine, b) == []
        assert (await case(engine, test_id)).status == "submitting"
    finally:
        await second.stop()


async def test_a_dead_instances_submit_is_failed_by_the_leader_after_its_ttl(
    engine: AsyncEngine, make_beat: MakeBeat, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_beat("ctl-a"), make_beat("ctl-b")
    await a.start()
    await b.start()
    test_id = await in_flight(engine, "ctl-a")
    await a.stop(release=False)  # the process died: no more renewals, the row stays
    last = await heartbeat_row(engine, "ctl-a")
    gone_at = last.expires_at + timedelta(seconds=SKEW_S)  # ttl + skew after its last renewal
    while datetime.now(UTC) < gone_at - timedelta(seconds=0.1):
        assert await recover_orphaned(engine, b) == []  # its heartbeat still counts: not before
        assert (await case(engine, test_id)).status == "submitting"
        await asyncio.sleep(0.1)
    await asyncio.sleep((gone_at - datetime.now(UTC)).total_seconds() + 0.05)
    assert await recover_orphaned(engine, b) == [test_id]
    row = await case(engine, test_id)
    assert (row.status, row.error, row.price) == ("failed", gone_error("ctl-a"), 0.05)  # may be charged
    record = next(r for r in caplog.records if getattr(r, "test_id", None) == test_id)
    assert record.levelno == logging.WARNING and record.__dict__["instance"] == "ctl-a"
    assert "found by the leader ctl-b" in record.getMessage()
    assert await recover_orphaned(engine, b) == []  # once


async def test_an_expired_instances_submit_is_failed_at_another_instances_start(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat
) -> None:
    long_ago = datetime.now(UTC) - PRUNE_AFTER - timedelta(minutes=1)
    async with engine.begin() as conn:  # a dead instance's heartbeat, and one's that never wrote any
        await conn.execute(
            s.instances.insert().values(
                id="ctl-dead", started_at=long_ago, renewed_at=long_ago, expires_at=long_ago
            )
        )
    dead, missing = await in_flight(engine, "ctl-dead"), await in_flight(engine, "ctl-unknown")
    b = make_beat("ctl-b")
    await b.start()
    second = scheduler(engine, database_url, b)
    await second.start()
    await second.stop()
    assert [(r.status, r.error) for r in [await case(engine, dead), await case(engine, missing)]] == [
        ("failed", gone_error("ctl-dead")),
        ("failed", gone_error("ctl-unknown")),
    ]
    assert await heartbeat_row(engine, "ctl-dead") is not None
    await recover_orphaned(engine, b)  # the leader's pass prunes heartbeats a day past their expiry
    assert await heartbeat_row(engine, "ctl-dead") is None
    assert await heartbeat_row(engine, "ctl-b") is not None


async def test_a_restart_under_the_same_instance_id_recovers_its_own_submits_at_start(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat
) -> None:
    before = make_beat("ctl-a")
    await before.start()
    test_id = await in_flight(engine, "ctl-a")
    await before.stop(release=False)  # killed; its heartbeat has not expired yet
    again = make_beat("ctl-a")
    await again.start()
    restarted = scheduler(engine, database_url, again)
    await restarted.start()
    try:
        row = await case(engine, test_id)
        assert (row.status, row.error) == ("failed", gone_error("ctl-a"))
    finally:
        await restarted.stop()


async def test_claims_from_before_the_migration_are_recovered_at_start_only(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat
) -> None:
    b = make_beat("ctl-b")
    await b.start()
    old = await in_flight(engine, None)
    assert await recover_orphaned(engine, b) == []  # an old version may still run it: not later
    assert (await case(engine, old)).status == "submitting"
    second = scheduler(engine, database_url, b)
    await second.start()
    await second.stop()
    row = await case(engine, old)
    assert (row.status, row.error, row.claimed_by) == ("failed", STOPPED_ERROR, None)


async def test_a_scheduler_without_heartbeat_fails_every_submit_left_at_start(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat
) -> None:
    live = make_beat("ctl-a")
    await live.start()
    test_id = await in_flight(engine, "ctl-a")
    lone = Scheduler(engine, ScheduleConfig(), RecordingSubmitter(), database_url)  # the only one
    await lone.start()
    await lone.stop()
    assert (await case(engine, test_id)).status == "failed"


async def test_dispatch_names_its_instance_and_claims_nothing_without_a_fresh_heartbeat(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat, caplog: pytest.LogCaptureFixture
) -> None:
    beat = make_beat("ctl-a")
    submitter = RecordingSubmitter()
    dispatcher = Scheduler(engine, ScheduleConfig(), submitter, database_url, heartbeat=beat)
    test_id = await due(engine)
    assert not beat.alive  # never renewed: another instance may take it for gone
    report = await dispatcher.dispatch_due()
    assert (report.submitted, submitter.requests) == ([], [])
    assert (await case(engine, test_id)).status == "scheduled"
    assert "instance ctl-a dispatches nothing until its heartbeat is renewed" in caplog.text
    await beat.start()
    report = await dispatcher.dispatch_due()
    assert report.submitted == [test_id]
    row = await case(engine, test_id)
    assert (row.status, row.claimed_by) == ("submitted", "ctl-a")
    assert "instance ctl-a dispatches again" in caplog.text


async def test_a_clean_stop_fails_its_own_cut_short_submits_and_removes_its_heartbeat(
    engine: AsyncEngine, database_url: str, make_beat: MakeBeat, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedule, "STOP_GRACE_S", 0.2)
    await make_beat("ctl-other").start()
    other = await in_flight(engine, "ctl-other")
    beat = make_beat("ctl-a")
    await beat.start()
    submitter = RecordingSubmitter()
    submitter.script = ["hang"]
    running = Scheduler(
        engine, ScheduleConfig(dispatch_interval_s=0.05), submitter, database_url, heartbeat=beat
    )
    await running.start()
    test_id = await due(engine)
    for _ in range(100):
        if submitter.requests:
            break
        await asyncio.sleep(0.05)
    assert [r.test_case_id for r in submitter.requests] == [test_id]
    await running.stop()
    await beat.stop()
    row = await case(engine, test_id)
    assert (row.status, row.error, row.claimed_by) == ("failed", gone_error("ctl-a"), "ctl-a")
    assert (await case(engine, other)).status == "submitting"  # another instance's: not ours to fail
    assert await heartbeat_row(engine, "ctl-a") is None  # orphaned at once, were anything left


# --- two controllers, one of them killed mid-submit -------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.05)


async def test_a_controller_killed_mid_submit_is_recovered_by_the_other_after_the_ttl(
    database_url: str, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    received: list[Any] = []
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:  # a route that never answers in time
        received.append(await request.json())
        await release.wait()
        return web.json_response({"id": "late"})

    provider = web.Application()
    provider.router.add_post("/sms", hang)
    runner = web.AppRunner(provider, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    engine = await open_database(database_url)
    await seed(engine, [probe(IMSI)], {"r1": {}})
    async with engine.begin() as conn:
        await conn.execute(
            s.routes.insert().values(
                name="slow",
                prices={},
                enabled=True,
                connector={
                    "kind": "http",
                    "url": f"http://{host}:{port}/sms",
                    "body_template": {"to": "{to}", "text": "{text}"},
                    "message_id_path": "id",
                    "timeout_s": 600,
                    "max_retries": 0,
                },
            )
        )

    leader = {"ttl_s": TTL_S, "renew_interval_s": RENEW_S, "max_clock_skew_s": SKEW_S}
    config_file = tmp_path / "killed.toml"
    config_file.write_text(
        f"database_url = {json.dumps(database_url)}\n"
        f'[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nclient_id = "controller-killed"\n'
        f"[api]\nport = {free_port()}\n"
        "[sender]\nsync_interval_s = 0.2\n"
        "[schedule]\ndispatch_interval_s = 0.1\nsubmit_timeout_s = 600\n"
        f"[leader]\nttl_s = {TTL_S}\nrenew_interval_s = {RENEW_S}\nmax_clock_skew_s = {SKEW_S}\n"
    )
    config_a = load(config_file)
    killed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli",
        "serve",
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    config_b = controller_config(database_url, mosquitto, "survivor")
    config_b = config_b.model_copy(
        update={
            "leader": config_b.leader.model_copy(update=leader),
            "correlation": config_b.correlation.model_copy(update={"sweep_interval_s": 0.2}),
        }
    )
    stop_b = asyncio.Event()
    survivor: asyncio.Task[None] | None = None
    try:
        first = await until_leader(config_a, 30.0)  # up, its sender started with the route
        test_id = await due(engine, "slow")

        async def claimed() -> Any:
            row = await case(engine, test_id)
            return received and row.status == "submitting" and row

        row = await wait_until(claimed, 20.0, "the first controller submits on the slow route")
        assert row.claimed_by == first["instance"]

        survivor = asyncio.create_task(serve(config_b, stop_b, RecordingSubmitter()))
        second = await health_when_up(config_b, 15.0)
        assert second["leader"] is False
        await asyncio.sleep(2 * RENEW_S)  # started and dispatching: a live instance's submit stays
        assert (await case(engine, test_id)).status == "submitting"

        killed.send_signal(signal.SIGKILL)
        await killed.wait()
        last = await heartbeat_row(engine, first["instance"])
        assert last is not None  # no clean stop: the row is left to expire
        gone_at = last.expires_at + timedelta(seconds=SKEW_S)
        await until_leader(config_b, TTL_S + RENEW_S + SLACK_S + 5.0)

        async def failed() -> Any:
            row = await case(engine, test_id)
            return row.status == "failed" and (row, datetime.now(UTC))

        row, seen = await wait_until(failed, TTL_S + SKEW_S + 5.0, "the survivor recovers the test")
        assert seen >= gone_at  # not before the killed instance's heartbeat expired
        assert (seen - gone_at).total_seconds() <= 0.2 + SLACK_S + 1.0  # within a sweep or so
        assert row.error == gone_error(first["instance"])
    finally:
        if killed.returncode is None:
            killed.kill()
            await killed.wait()
        stop_b.set()
        if survivor is not None:
            await asyncio.wait_for(survivor, 30)
        release.set()
        await runner.cleanup()
        await engine.dispose()
