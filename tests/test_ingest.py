"""Controller ingest against a real mosquitto and both databases (SQLite file, PostgreSQL):
validation with dead letters, duplicates removed, agent and probe status, and a controller
killed and restarted while agents publish, losing nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import load
from controller.service import serve
from controller.storage import schema as s
from controller.storage.db import make_engine
from probe_agent.protocol import AgentStatus, ClockState, ModemState, Observation, SimIdentity, Topics
from tests.mosquitto import Mosquitto, Recorder, connected_client

T = Topics()
NOW = datetime.now(UTC)


def controller_toml(path: Path, broker: Mosquitto, url: str) -> Path:
    path.write_text(
        f'database_url = "{url}"\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'client_id = "controller-test"\nreconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n'
        "[api]\nport = 0\n"
    )
    return path


def observation(i: int, agent: str = "pi-uk-1") -> Observation:
    return Observation(
        id=f"obs-{agent}-{i:05d}",
        agent=agent,
        modem="modem-a",
        sim=SimIdentity(imsi="234150000000001", mcc_mnc="23415"),
        sender="MyBank",
        sender_type="alphanumeric",
        text=f"Your code is {i:06d}",
        smsc="+447785016005",
        scts=NOW,
        urc_at=NOW + timedelta(milliseconds=i),
        completed_at=NOW + timedelta(milliseconds=i),
        parts=1,
        total_parts=1,
        partial=False,
        origin="cmti",
        pdus=["00"],
        clock=ClockState(),
        software_version="0.1.0",
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url)
    yield eng
    await eng.dispose()


def onlines(recorder: Recorder) -> int:
    """How many times a controller announced itself online (it subscribes before it does)."""
    return sum(b'"online"' in p for p in recorder.payloads("/controller/status"))


@pytest.fixture
async def controller(
    tmp_path: Path,
    mosquitto: Mosquitto,
    database_url: str,
) -> AsyncIterator[Callable[[], Awaitable[asyncio.Event]]]:
    """Starts a controller in this process; each start returns once it is subscribed (its
    status says online), however slowly the machine migrates the database."""
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    config = load(controller_toml(tmp_path / "controller.toml", mosquitto, database_url))
    recorder = Recorder(mosquitto, [T.controller_status()])

    async def start() -> asyncio.Event:
        before = onlines(recorder)
        stop = asyncio.Event()
        stops.append((stop, asyncio.create_task(serve(config, stop))))
        await asyncio.to_thread(recorder.wait_for, lambda _: onlines(recorder) > before, 60.0)
        return stop

    yield start
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, 30)
    recorder.close()


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def wait_for(check: Callable[[], Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_valid_stored_once_invalid_dead_lettered(
    mosquitto: Mosquitto, controller: Callable[[], Awaitable[asyncio.Event]], engine: AsyncEngine
) -> None:
    await controller()
    pub = connected_client(mosquitto)
    for i in range(50):
        pub.publish(T.sms("pi-uk-1"), observation(i).to_json(), qos=1)
    for i in range(10):  # at-least-once: the same observations again
        pub.publish(T.sms("pi-uk-1"), observation(i).to_json(), qos=1)
    pub.publish(T.sms("pi-uk-1"), b"{not json", qos=1)
    pub.publish(T.sms("pi-uk-1"), b'{"id": "x"}', qos=1)
    pub.publish(T.health("pi-uk-2"), b'{"agent": "pi-uk-2", "at": "yesterday"}', qos=1)

    async def done() -> bool:
        return await count(engine, s.observations) == 50 and await count(engine, s.dead_letters) == 3

    await wait_for(done)
    await asyncio.sleep(0.3)
    assert await count(engine, s.observations) == 50
    async with engine.connect() as conn:
        dead = (await conn.execute(select(s.dead_letters).order_by(s.dead_letters.c.id))).all()
        invalid = dict((await conn.execute(select(s.agents.c.id, s.agents.c.invalid_payloads))).all())
        stored = (
            await conn.execute(select(s.observations).where(s.observations.c.id == "obs-pi-uk-1-00007"))
        ).one()
    assert [d.topic for d in dead] == [T.sms("pi-uk-1"), T.sms("pi-uk-1"), T.health("pi-uk-2")]
    assert "Invalid JSON" in dead[0].error and "agent" in dead[1].error and "at" in dead[2].error
    assert dead[0].payload == b"{not json"
    assert invalid == {"pi-uk-1": 2, "pi-uk-2": 1}
    assert stored.text == "Your code is 000007" and stored.payload["clock"]["source"] == "none"
    assert stored.urc_at.astimezone(UTC) == NOW + timedelta(milliseconds=7)
    pub.loop_stop()


async def test_agent_status_follows_sessions_and_ignores_a_late_will(
    mosquitto: Mosquitto, controller: Callable[[], Awaitable[asyncio.Event]], engine: AsyncEngine
) -> None:
    await controller()
    pub = connected_client(mosquitto)
    old = AgentStatus(state="online", agent="pi-1", session="old", version="1", started_at=NOW, at=NOW)
    new = AgentStatus(
        state="online",
        agent="pi-1",
        session="new",
        version="1",
        started_at=NOW + timedelta(seconds=5),
        at=NOW,
    )
    late_will = AgentStatus(state="lost", agent="pi-1", session="old", version="1", started_at=NOW)

    async def state() -> tuple[str, str]:
        async with engine.connect() as conn:
            row = (await conn.execute(select(s.agents.c.state, s.agents.c.session))).one_or_none()
        return (row.state, row.session) if row else ("", "")

    for status in (old, new, late_will):
        pub.publish(T.status("pi-1"), status.to_json(), qos=1, retain=True).wait_for_publish(5)
        await asyncio.sleep(0.3)
    assert await state() == ("online", "new"), "the old session's will does not mark the live agent lost"
    lost = AgentStatus(state="lost", agent="pi-1", session="new", version="1", started_at=new.started_at)
    pub.publish(T.status("pi-1"), lost.to_json(), qos=1, retain=True).wait_for_publish(5)

    async def is_lost() -> bool:
        return await state() == ("lost", "new")

    await wait_for(is_lost)
    pub.loop_stop()


async def test_probe_moves_and_sim_changes_are_noticed(
    mosquitto: Mosquitto, controller: Callable[[], Awaitable[asyncio.Event]], engine: AsyncEngine
) -> None:
    await controller()
    pub = connected_client(mosquitto)

    def state(agent: str, modem: str, imsi: str) -> bytes:
        return ModemState(
            agent=agent, modem=modem, port="/dev/gsm/x", connected=True, imsi=imsi, mcc_mnc="23415"
        ).to_json()

    pub.publish(T.modem_state("pi-1", "m1"), state("pi-1", "m1", "234150000000001"), qos=1).wait_for_publish(
        5
    )
    await asyncio.sleep(0.3)
    pub.publish(T.modem_state("pi-2", "m1"), state("pi-2", "m1", "234150000000001"), qos=1).wait_for_publish(
        5
    )
    await asyncio.sleep(0.3)
    pub.publish(T.modem_state("pi-2", "m1"), state("pi-2", "m1", "234150000000002"), qos=1).wait_for_publish(
        5
    )

    async def events() -> bool:
        return await count(engine, s.probe_events) == 2

    await wait_for(events)
    async with engine.connect() as conn:
        kinds = [
            (e.kind, e.imsi)
            for e in (await conn.execute(select(s.probe_events).order_by(s.probe_events.c.id)))
        ]
        probes = {p.imsi: (p.agent_id, p.modem_id) for p in await conn.execute(select(s.probes))}
    assert kinds == [("sim_moved", "234150000000001"), ("sim_changed", "234150000000002")]
    assert probes == {"234150000000001": (None, None), "234150000000002": ("pi-2", "m1")}
    pub.loop_stop()


def test_controller_killed_and_restarted_while_agents_publish_loses_nothing(
    tmp_path: Path,
    mosquitto: Mosquitto,
    database_url: str,
) -> None:
    config = controller_toml(tmp_path / "controller.toml", mosquitto, database_url)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "controller.log", "ab"),
        )

    recorder = Recorder(mosquitto, [T.controller_status()])
    proc = start()
    # Online once subscribed: its persistent session exists at the broker from here on.
    recorder.wait_for(lambda _: onlines(recorder) > 0, 60.0)
    pub = connected_client(mosquitto)
    total = 1500
    done = publish_in_background(pub, total)
    time.sleep(1.0)
    workers = mqtt_workers(proc.pid)
    assert len(workers) == 1, "the controller holds its broker connection in one MQTT worker"
    proc.send_signal(signal.SIGKILL)  # mid-stream: some written, some received but not acked
    proc.wait(10)
    # Its worker leaves with it, without a DISCONNECT: the broker publishes the controller's will.
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    recorder.wait_for(lambda _: any(b'"lost"' in p for p in recorder.payloads("/controller/status")), 10.0)
    time.sleep(1.0)  # agents keep publishing into the queued session
    proc = start()
    assert done.wait(60)

    async def stored() -> int:
        engine = make_engine(database_url)
        try:
            return await count(engine, s.observations)
        finally:
            await engine.dispose()

    deadline = time.monotonic() + 60
    while asyncio.run(stored()) < total:
        assert time.monotonic() < deadline, f"only {asyncio.run(stored())} of {total} stored"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert asyncio.run(stored()) == total
    pub.loop_stop()
    recorder.close()


def publish_in_background(pub: mqtt.Client, total: int) -> threading.Event:
    """Observations 0..total-1 from one agent, 2 ms apart, from a thread; the event is set when
    the last one was handed to paho."""
    done = threading.Event()

    def publish() -> None:
        for i in range(total):
            pub.publish(T.sms("pi-uk-1"), observation(i).to_json(), qos=1)
            time.sleep(0.002)
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    return done


def mqtt_workers(pid: int) -> list[psutil.Process]:
    """The MQTT worker processes (``controller.mqtt``) a controller process started."""
    return [c for c in psutil.Process(pid).children() if "controller.mqtt" in c.cmdline()]


async def test_a_killed_mqtt_worker_is_replaced_and_nothing_is_lost(
    mosquitto: Mosquitto, controller: Callable[[], Awaitable[asyncio.Event]], engine: AsyncEngine
) -> None:
    """Tried: the MQTT worker is killed while agents publish. The controller starts another,
    which resumes the session: everything not acknowledged comes again (acknowledgements still
    owed to the dead worker's connection are dropped, not sent on the new one), and every
    observation is stored once."""
    await controller()
    recorder = Recorder(mosquitto, [T.controller_status()])
    await asyncio.to_thread(recorder.wait_for, lambda _: onlines(recorder) > 0, 10.0)  # the retained one
    onlines_before = onlines(recorder)
    pub = connected_client(mosquitto)
    total = 600
    done = publish_in_background(pub, total)
    await asyncio.sleep(0.5)
    (worker,) = mqtt_workers(os.getpid())
    worker.kill()
    await asyncio.to_thread(recorder.wait_for, lambda _: onlines(recorder) > onlines_before, 30.0)
    assert await asyncio.to_thread(done.wait, 30)

    async def all_stored() -> bool:
        return await count(engine, s.observations) == total

    await wait_for(all_stored, timeout_s=30)
    assert len(mqtt_workers(os.getpid())) == 1
    pub.loop_stop()
    recorder.close()


async def test_a_failed_write_is_retried_through_the_broker(
    tmp_path: Path,
    mosquitto: Mosquitto,
    controller: Callable[[], Awaitable[asyncio.Event]],
    engine: AsyncEngine,
) -> None:
    """The database refuses writes for a while (SQLite locked past its busy timeout): nothing was
    acknowledged, so after the controller reconnects the broker resends and all are stored."""
    if engine.dialect.name != "sqlite":
        pytest.skip("locking the whole database from outside is a SQLite test")
    import sqlite3

    await controller()
    path = engine.url.database
    assert path is not None
    # the controller itself writes now and then (lease renewals, rounds): wait for its lock
    blocker = sqlite3.connect(path, isolation_level=None, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    pub = connected_client(mosquitto)
    for i in range(20):
        pub.publish(T.sms("pi-uk-1"), observation(i).to_json(), qos=1)
    await asyncio.sleep(7.0)  # longer than the 5 s busy timeout: the batch write fails
    blocker.execute("ROLLBACK")
    blocker.close()

    async def all_stored() -> bool:
        return await count(engine, s.observations) == 20

    await wait_for(all_stored, timeout_s=20)
    pub.loop_stop()


async def _refuse_text(engine: AsyncEngine, text: str) -> None:
    """A real database rule (a trigger) that refuses one observation's row: the data is valid
    for the wire contract, but the database will not take it."""
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON observations "
                f"WHEN NEW.text = '{text}' BEGIN SELECT RAISE(ABORT, 'poison text refused'); END"
            )
        else:
            await conn.exec_driver_sql(
                "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.text = '{text}' THEN RAISE EXCEPTION 'poison text refused' "
                "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON observations "
                "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
            )


async def test_a_poison_message_is_dead_lettered_and_the_rest_of_its_batch_stored(
    database: AsyncEngine,
) -> None:
    """Tried: a batch of 20 observations, one of which the database refuses (a trigger), plus an
    agent status. The batch fails; each message is then written alone: 19 observations and the
    status are stored, the refused one is kept as a dead letter with the database's error, and
    every message is acknowledged (so the broker does not resend the poison one for ever)."""
    from controller.ingest import Ingest

    await _refuse_text(database, "Your code is 000007")
    ingest = Ingest(database, T, batch_max=1_000)
    acked: list[str] = []
    at = datetime.now(UTC)
    for i in range(20):
        obs = observation(i)
        await ingest.handle(T.sms(obs.agent), obs.to_json(), at, lambda i=i: acked.append(f"obs-{i}"))
    status = AgentStatus(
        agent="pi-uk-1", state="online", session="s1", version="0.1.0", started_at=at, dropped=0
    )
    await ingest.handle(T.status("pi-uk-1"), status.to_json(), at, lambda: acked.append("status"))
    await ingest.flush()

    assert sorted(acked) == sorted([f"obs-{i}" for i in range(20)] + ["status"])
    assert await count(database, s.observations) == 19
    async with database.connect() as conn:
        dead = (await conn.execute(select(s.dead_letters))).one()
        agent = (await conn.execute(select(s.agents).where(s.agents.c.id == "pi-uk-1"))).one()
    assert dead.topic == T.sms("pi-uk-1")
    assert "poison text refused" in dead.error and dead.error.startswith("could not be stored")
    assert Observation.model_validate_json(dead.payload).id == "obs-pi-uk-1-00007"
    assert agent.state == "online" and agent.invalid_payloads == 1
    assert ingest.stats.stored == 19 and ingest.stats.invalid["pi-uk-1"] == 1


async def test_a_database_that_is_down_leaves_the_batch_unacknowledged(tmp_path: Path) -> None:
    """Tried: the observations table is gone (a broken database), so every write fails with an
    operational error, not a data error: nothing is dead-lettered and nothing acknowledged (the
    broker keeps it for the next try)."""
    from controller.ingest import Ingest
    from controller.storage.db import open_database

    folder = tmp_path / "db"
    folder.mkdir()
    engine = await open_database(f"sqlite:///{folder / 'controller.db'}")
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP TABLE observations")  # stands in for a broken database
        ingest = Ingest(engine, T)
        acked: list[int] = []
        for i in range(3):
            obs = observation(i)
            await ingest.handle(T.sms(obs.agent), obs.to_json(), NOW, lambda i=i: acked.append(i))
        with pytest.raises(Exception, match="no such table"):
            await ingest.flush()
        assert acked == []
        assert await count(engine, s.dead_letters) == 0
    finally:
        await engine.dispose()


async def test_full_batches_are_written_behind_the_receive_loop(tmp_path: Path) -> None:
    """Tried: 25 observations with batches of 10, so two full batches are written while the next
    messages are taken, then the table is dropped and 10 more arrive. The first 20 are stored and
    acknowledged, the stored payload is the bytes received (not re-encoded); the batch that met
    the broken database is not acknowledged and ``on_failure`` is told (the service reconnects so
    the broker resends); the 5 still pending are written by ``close()`` only if it can."""
    from controller.ingest import Ingest
    from controller.storage.db import open_database

    folder = tmp_path / "db"
    folder.mkdir()
    engine = await open_database(f"sqlite:///{folder / 'controller.db'}")
    failures: list[int] = []
    try:
        ingest = Ingest(engine, T, batch_max=10, on_failure=lambda: failures.append(1))
        acked: list[int] = []
        raw: dict[str, bytes] = {}
        for i in range(20):
            obs = observation(i)
            raw[obs.id] = b"{ " + obs.to_json()[1:]  # as an agent may format it
            await ingest.handle(T.sms(obs.agent), raw[obs.id], NOW, lambda i=i: acked.append(i))
        await asyncio.gather(*ingest._flushing)
        assert sorted(acked) == list(range(20))
        async with engine.connect() as conn:
            stored = dict((await conn.exec_driver_sql("SELECT id, payload FROM observations")).all())
        assert stored == {i: payload.decode() for i, payload in raw.items()}
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP TABLE observations")  # stands in for a broken database
        for i in range(20, 35):
            obs = observation(i)
            await ingest.handle(T.sms(obs.agent), obs.to_json(), NOW, lambda i=i: acked.append(i))
        await asyncio.gather(*ingest._flushing)
        assert sorted(acked) == list(range(20)) and failures == [1]
        with pytest.raises(Exception, match="no such table"):
            await ingest.close()
        assert sorted(acked) == list(range(20))
    finally:
        await engine.dispose()


async def test_probe_samples_keep_changes_not_every_report(database: AsyncEngine) -> None:
    """Tried: a modem reporting every 10 s for 10 minutes with its signal wobbling by 1 dB (one
    batch), then a registration change, then the modem going down (no SIM readable); and a
    sample 31 days old. Kept: the first report, a signal change once per ``SAMPLE_EVERY``, every
    registration or connection change (each also a ``registration`` event on the probe); the old
    sample is pruned, another probe's is not."""
    from controller.ingest import SAMPLE_EVERY, SAMPLES_KEPT, Ingest

    imsi, other = "234150000000001", "234150000000009"
    t0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    old = t0 - SAMPLES_KEPT - timedelta(days=1)
    async with database.begin() as conn:
        for who in (imsi, other):
            await conn.execute(
                s.probe_samples.insert().values(imsi=who, at=old, signal_dbm=-99, connected=True)
            )
    ingest = Ingest(database, T, batch_max=1_000)

    def report(at: datetime, signal: int | None, registration: str | None, sim: str | None = imsi) -> Any:
        state = ModemState(
            agent="pi-1",
            modem="m1",
            port="/dev/gsm/x",
            connected=True,
            imsi=sim,
            mcc_mnc="23415",
            registration=registration,
            signal_dbm=signal,
        )
        return ingest.handle(T.modem_state("pi-1", "m1"), state.to_json(), at, lambda: None)

    for i in range(60):  # every 10 s: -70, -71, -70, ...
        await report(t0 + timedelta(seconds=10 * i), -70 - i % 2, "registered_home")
    await ingest.flush()
    changed = t0 + timedelta(minutes=11)
    await report(changed, -71, "searching")
    await ingest.flush()
    await report(changed + timedelta(seconds=5), None, None, sim=None)
    await ingest.flush()

    async with database.connect() as conn:
        p = s.probe_samples.c
        samples = (await conn.execute(select(p.imsi, p.at, p.signal_dbm, p.registration, p.connected))).all()
        events = (
            await conn.execute(
                select(s.probe_events.c.kind, s.probe_events.c.detail).order_by(s.probe_events.c.id)
            )
        ).all()
    mine = sorted((r.at, r.signal_dbm, r.registration, r.connected) for r in samples if r.imsi == imsi)
    assert [r.at for r in samples if r.imsi == other] == [old], "another probe's samples are its own"
    every = SAMPLE_EVERY.total_seconds()
    # 60 reports in 590 s: the first, and one signal change SAMPLE_EVERY later (at 310 s)
    assert [(at - t0).total_seconds() for at, *_ in mine] == [0, every + 10, 660, 665]
    assert [(signal, registration, up) for _, signal, registration, up in mine] == [
        (-70, "registered_home", True),
        (-71, "registered_home", True),
        (-71, "searching", True),
        (None, "searching", False),
    ]
    assert [(e.kind, e.detail) for e in events] == [
        ("registration", {"registration": {"from": "registered_home", "to": "searching"}}),
        ("registration", {"connected": {"from": True, "to": False}}),
    ]
