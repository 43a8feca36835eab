"""Storage on SQLite and PostgreSQL: the migrations build exactly the schema, run again as a no-op,
go down and up again; times keep their zone and JSON its content; SQLite runs in WAL mode with
foreign keys; a database that cannot be reached is a clear error that hides the password."""

from __future__ import annotations

import asyncio
import socket
import sys
from asyncio.subprocess import PIPE
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.storage import schema
from controller.storage.db import (
    DatabaseUnavailable,
    async_url,
    downgrade,
    head_revision,
    make_engine,
    masked,
    migrate,
    open_database,
)
from tests.db import database, database_url

__all__ = ["database", "database_url"]  # the fixtures, imported for the tests below

SCHEMA_TABLES = set(schema.metadata.tables)
NOW = datetime(2025, 3, 30, 0, 59, 59, 123_456, tzinfo=UTC)


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _schema_drift(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, schema.metadata))


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _agent(agent_id: str, **values: Any) -> dict[str, Any]:
    return {"id": agent_id, "state": "online", "status_at": NOW, "last_seen_at": NOW} | values


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite:////var/lib/pf/x.db", "sqlite+aiosqlite:////var/lib/pf/x.db"),
        ("x.db", "sqlite+aiosqlite:///x.db"),
        ("/var/lib/pf/x.db", "sqlite+aiosqlite:////var/lib/pf/x.db"),
        ("postgresql://u:p@db:5432/pf", "postgresql+asyncpg://u:p@db:5432/pf"),
        ("postgres://u@db/pf", "postgresql+asyncpg://u@db/pf"),
        ("postgresql+asyncpg://u@db/pf", "postgresql+asyncpg://u@db/pf"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("mysql+aiomysql://u@db/pf", "mysql+aiomysql://u@db/pf"),
    ],
)
def test_async_url(given: str, expected: str) -> None:
    assert async_url(given) == expected


def test_masked_hides_the_password() -> None:
    assert masked("postgresql://pf:s3cret@db:5432/pf") == "postgresql://pf:***@db:5432/pf"
    assert masked("/var/lib/pf/x.db") == "/var/lib/pf/x.db"


async def test_open_creates_every_table_at_head(database: AsyncEngine) -> None:
    async with database.connect() as conn:
        assert await conn.run_sync(_tables) == SCHEMA_TABLES | {"alembic_version"}
        assert await conn.run_sync(_revision) == head_revision()


async def test_migrations_match_the_schema(database: AsyncEngine) -> None:
    async with database.connect() as conn:
        assert await conn.run_sync(_schema_drift) == []


async def test_open_twice_is_a_no_op(
    database_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the packaged migrations are found from any working directory
    engine = await open_database(database_url)
    async with engine.begin() as conn:
        await conn.execute(schema.agents.insert(), [_agent("pi-1")])
    await engine.dispose()
    assert "Running upgrade" in caplog.text

    caplog.clear()
    engine = await open_database(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_revision) == head_revision()
            assert (await conn.execute(select(schema.agents.c.id))).scalars().all() == ["pi-1"]
    finally:
        await engine.dispose()
    assert "Running upgrade" not in caplog.text


async def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    await migrate(database_url)
    await downgrade(database_url, "base")
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == {"alembic_version"}
            assert await conn.run_sync(_revision) is None
    finally:
        await engine.dispose()

    engine = await open_database(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == SCHEMA_TABLES | {"alembic_version"}
            assert await conn.run_sync(_revision) == head_revision()
            assert await conn.run_sync(_schema_drift) == []
    finally:
        await engine.dispose()


#: A controller process in miniature: it migrates when told to go, so that all start together.
CONTROLLER = """
import asyncio, sys
from controller.storage.db import migrate
print("ready", flush=True)
sys.stdin.readline()
asyncio.run(migrate(sys.argv[1]))
"""


async def test_controllers_starting_together_migrate_one_at_a_time(database_url: str) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CONTROLLER, database_url, stdin=PIPE, stdout=PIPE, stderr=PIPE
        )
        for _ in range(3)
    ]
    for process in processes:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
    outputs = [await process.communicate() for process in processes]
    failed = [
        err.decode() for process, (_, err) in zip(processes, outputs, strict=True) if process.returncode
    ]
    assert not failed, failed[0]
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_revision) == head_revision()
            assert await conn.run_sync(_schema_drift) == []
    finally:
        await engine.dispose()


async def test_one_process_opening_databases_together(database_url: str, tmp_path: Path) -> None:
    # Alembic's state is global to the process: migrations of two databases must not interleave.
    urls = [database_url, str(tmp_path / "second.db"), database_url]
    opened = await asyncio.gather(*(open_database(url) for url in urls), return_exceptions=True)
    engines = [engine for engine in opened if isinstance(engine, AsyncEngine)]
    try:
        assert len(engines) == len(urls), [repr(failure) for failure in opened if failure not in engines]
        for engine in engines:
            async with engine.connect() as conn:
                assert await conn.run_sync(_revision) == head_revision()
    finally:
        for engine in engines:
            await engine.dispose()


async def test_aware_datetime_and_json_round_trip(database: AsyncEngine) -> None:
    cest = timezone(timedelta(hours=2))
    started = datetime(2025, 6, 1, 14, 30, 15, 250_000, tzinfo=cest)
    health = {"spool": {"depth": 3, "dropped": 0}, "clock": {"offset_ms": -1.5, "source": "ntp"}, "ok": True}
    state = {"operator": "Orange F", "note": "ünïcödé ✓ 😀", "sms": [1, 2, None]}
    async with database.begin() as conn:
        await conn.execute(schema.agents.insert(), [_agent("pi-1", started_at=started, health=health)])
        await conn.execute(
            schema.probes.insert(),
            [{"imsi": "208010123456789", "agent_id": "pi-1", "state": state, "updated_at": NOW}],
        )
    async with database.connect() as conn:
        agent = (await conn.execute(select(schema.agents))).one()
        probe = (await conn.execute(select(schema.probes))).one()
    assert agent.started_at == started
    assert agent.started_at.utcoffset() == timedelta(0)  # aware, in UTC
    assert agent.started_at.microsecond == 250_000
    assert agent.health == health
    assert probe.state == state
    assert probe.updated_at == NOW
    assert agent.dropped == 0 and probe.connected is False  # Python-side defaults


async def test_json_default_is_a_fresh_list(database: AsyncEngine) -> None:
    async with database.begin() as conn:
        await conn.execute(schema.networks.insert(), [{"mcc_mnc": "20801"}, {"mcc_mnc": "20810"}])
    async with database.connect() as conn:
        smscs = (await conn.execute(select(schema.networks.c.smsc_addresses))).scalars().all()
    assert smscs == [[], []]


async def test_times_in_other_zones_compare_as_instants(database: AsyncEngine) -> None:
    # 10:30 in Paris (08:30 UTC) is earlier than 09:00 UTC, though its wall clock is later.
    paris = datetime(2025, 6, 1, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    utc = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    async with database.begin() as conn:
        await conn.execute(
            schema.agents.insert(), [_agent("late", status_at=utc), _agent("early", status_at=paris)]
        )
    async with database.connect() as conn:
        ordered = (await conn.execute(select(schema.agents.c.id).order_by(schema.agents.c.status_at))).all()
        after = (
            await conn.execute(select(schema.agents.c.id).where(schema.agents.c.status_at > paris))
        ).all()
    assert [row.id for row in ordered] == ["early", "late"]
    assert [row.id for row in after] == ["late"]


async def test_naive_datetime_is_refused(database: AsyncEngine) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with database.begin() as conn:
            await conn.execute(schema.agents.insert(), [_agent("pi-1", status_at=datetime(2025, 1, 1))])


async def test_foreign_keys_are_enforced(database: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with database.begin() as conn:
            await conn.execute(
                schema.probes.insert(), [{"imsi": "208010123456789", "agent_id": "nobody", "updated_at": NOW}]
            )


async def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    engine = await open_database(str(tmp_path / "controller.db"))
    try:
        # Two connections at once: every pooled connection, not only the first, is set up.
        async with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
                assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 1  # NORMAL
                assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 5000
    finally:
        await engine.dispose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_postgresql_is_a_clear_error() -> None:
    port = _closed_port()
    with pytest.raises(DatabaseUnavailable) as raised:
        await open_database(f"postgresql://pf:s3cret@127.0.0.1:{port}/pf")
    message = str(raised.value)
    assert f"postgresql://pf:***@127.0.0.1:{port}/pf" in message
    assert "s3cret" not in message


async def test_missing_postgresql_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable, match='pf_no_such_database" does not exist') as raised:
        await open_database("postgresql://postgres:s3cret@127.0.0.1:5432/pf_no_such_database")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("where", ["under a file", "in a missing folder"])
async def test_unwritable_sqlite_path_is_a_clear_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / ("file" if where == "under a file" else "missing") / "controller.db"
    with pytest.raises(DatabaseUnavailable) as raised:
        await open_database(f"sqlite:///{path}")
    assert str(path) in str(raised.value)
    assert "unable to open database file" in str(raised.value)


async def test_unusable_url_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable, match=r"nosuchdb://pf:\*\*\*@db/pf"):
        await open_database("nosuchdb://pf:s3cret@db/pf")


async def test_sqlite_in_memory_works_for_quick_tests() -> None:
    engine = await open_database("sqlite://")
    try:
        async with engine.begin() as conn:
            await conn.execute(schema.agents.insert(), [_agent("pi-1")])
        async with engine.connect() as conn:
            assert (await conn.execute(select(schema.agents.c.id))).scalar() == "pi-1"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await engine.dispose()
