"""The database adapter: an async engine for SQLite or PostgreSQL, and the migrations run at start.

One URL picks the backend. SQLite (a file, the default) runs in WAL mode so readers never block
the writer; PostgreSQL serves a production controller and several controller instances at once.
The rest of the controller talks SQLAlchemy Core to the engine that :func:`open_database`
returns and never needs to know which driver is underneath. The Alembic migrations are packaged
beside this module and run at every start, so a new version upgrades the database it finds; a
lock makes controllers that start together migrate one after the other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
#: Async drivers for the URL schemes a user writes (``postgres://`` is a common alias).
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
#: Run on every new SQLite connection. WAL: readers and the one writer do not block each other;
#: synchronous=NORMAL is durable in WAL mode except for the last commits on a power cut, and
#: much faster than FULL; foreign keys are off in SQLite unless asked for on each connection;
#: busy_timeout waits for another writer instead of failing at once with "database is locked".
SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout=5000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
#: Added to a SQLite open error, whose own words ("unable to open database file") do not say why.
SQLITE_OPEN_HINT = " (does its folder exist, and may this user write there?)"
#: While one connection turns a new SQLite file to WAL, another can be told "database is locked"
#: at once, without waiting busy_timeout: the first connection is retried this often, pausing.
SQLITE_LOCKED_ATTEMPTS = 5
SQLITE_LOCKED_PAUSE_S = 0.05
#: aiosqlite's per-connection thread, by the name Python gives it; and how long to wait for it.
AIOSQLITE_WORKER = "(_connection_worker_thread)"
AIOSQLITE_SETTLE_S = 1.0
#: An unreachable PostgreSQL host is reported after this, not after asyncpg's default minute.
PG_CONNECT_TIMEOUT_S = 10.0
#: Ingest writes in batches and the API reads: a few connections are enough for one controller,
#: and several controllers share one server, whose default limit is 100 connections.
PG_POOL_SIZE = 5
PG_MAX_OVERFLOW = 5
#: Replace connections older than this, before a firewall or a pooler drops them silently.
PG_POOL_RECYCLE_S = 1800
#: Key of the PostgreSQL advisory lock held while migrating ("pf" and 1; any fixed number).
PG_MIGRATION_LOCK = 0x7066_0001


_ALEMBIC_LOCKS: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = WeakKeyDictionary()


class DatabaseUnavailable(Exception):
    """The database cannot be reached or opened at start; the message says which URL (password
    masked) and why."""


def async_url(url: str) -> str:
    """The URL with its async driver: a bare path or ``sqlite://`` gets aiosqlite, ``postgresql://``
    gets asyncpg; a URL that already names a driver, or another database, is left as it is."""
    if "://" not in url:
        return f"sqlite+aiosqlite:///{url}"
    scheme, _, rest = url.partition("://")
    driver = ASYNC_DRIVERS.get(scheme)
    return f"{driver}://{rest}" if driver else url


def masked(url: str) -> str:
    """The URL for messages and logs, with its password (if any) replaced by ``***``."""
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not parseable: mask what looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """A ``connect`` event listener: every new SQLite connection gets ``SQLITE_PRAGMAS`` (the
    async engine's and the scheduler's synchronous job-store engine's alike)."""
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


class RawJson(str):
    """JSON text that is already serialised (a payload as it arrived, validated): a JSON column
    stores it as it is instead of parsing and re-encoding it."""

    __slots__ = ()


def _json_serializer(value: Any) -> str:
    return value if isinstance(value, RawJson) else json.dumps(value)


def make_engine(url: str) -> AsyncEngine:
    """An async engine for the URL (see :func:`async_url`), set up for its backend. It does not
    connect yet: :func:`open_database` does, and migrates."""
    target = make_url(async_url(url))
    backend = target.get_backend_name()
    if backend == "sqlite":
        engine = create_async_engine(target, json_serializer=_json_serializer)
        event.listen(engine.sync_engine, "connect", set_sqlite_pragmas)
        return engine
    if backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if target.get_driver_name() == "asyncpg":
            connect_args = {
                "timeout": PG_CONNECT_TIMEOUT_S,
                "server_settings": {"application_name": "probe-fleet"},
            }
        return create_async_engine(
            target,
            pool_size=PG_POOL_SIZE,
            max_overflow=PG_MAX_OVERFLOW,
            pool_recycle=PG_POOL_RECYCLE_S,
            pool_pre_ping=True,  # a server restart costs one retry, not one failed request
            connect_args=connect_args,
            json_serializer=_json_serializer,
        )
    return create_async_engine(target, json_serializer=_json_serializer)


def alembic_config(connection: Connection | None = None) -> Config:
    """The packaged Alembic configuration; with a connection, env.py migrates on it."""
    config = Config(str(MIGRATIONS / "alembic.ini"))
    config.attributes["connection"] = connection
    return config


async def run_exclusive(engine: AsyncEngine, work: Callable[[Connection], None]) -> None:
    """Run ``work`` (an Alembic command, or env.py's migrations) on one connection, in one
    transaction, holding the database's migration lock (PostgreSQL's advisory lock, SQLite's
    write lock) and this process's. Committed only if ``work`` returns."""
    async with _process_lock(), engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        try:
            if sqlite:
                # Batch migrations copy a table and drop the old one, which fails (or cascades)
                # while other tables refer to it. SQLite ignores this pragma in a transaction,
                # so it comes first, and is turned back on once the transaction is over.
                await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
            await conn.run_sync(work)
            if sqlite:
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
            await conn.commit()
        finally:
            if sqlite:
                await _foreign_keys_back_on(conn)


async def _foreign_keys_back_on(conn: AsyncConnection) -> None:
    try:
        await conn.rollback()  # nothing left to roll back after a commit; needed after a failure
        await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        if (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1:
            return
    except DBAPIError:
        pass
    await conn.invalidate()  # never back into the pool without foreign keys


def _process_lock() -> asyncio.Lock:
    # Alembic keeps the running command in module globals (alembic.context, alembic.op), so two
    # commands interleaving on one event loop, even on two databases, would break each other.
    loop = asyncio.get_running_loop()
    return _ALEMBIC_LOCKS.setdefault(loop, asyncio.Lock())


def dialect_insert(bind: AsyncEngine | AsyncConnection) -> Any:
    """The ``insert`` of the bind's backend, which has ``on_conflict_do_nothing`` / ``_do_update``
    (PostgreSQL and SQLite spell them alike)."""
    return postgresql.insert if bind.dialect.name == "postgresql" else sqlite.insert


def head_revision() -> str:
    """The newest migration: what :func:`open_database` upgrades to."""
    head = ScriptDirectory.from_config(Config(str(MIGRATIONS / "alembic.ini"))).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


async def _alembic(engine: AsyncEngine, action: Callable[[Config], None]) -> None:
    await run_exclusive(engine, lambda connection: action(alembic_config(connection)))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        exc = exc.orig or exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc).strip() or type(exc).__name__


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def _aiosqlite_workers() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.endswith(AIOSQLITE_WORKER)}


async def _settle(threads: set[threading.Thread]) -> None:
    """Wait a little for the threads of failed aiosqlite connections to end. After a failed
    connect aiosqlite stops its thread without waiting; if the caller's loop closes first, the
    thread dies on "Event loop is closed" (omnilib/aiosqlite#241) and prints a traceback after
    our clear error."""
    for thread in threads:
        await asyncio.to_thread(thread.join, AIOSQLITE_SETTLE_S)


async def _connected(url: str) -> AsyncEngine:
    """An engine for the URL whose first connection worked, else :class:`DatabaseUnavailable`."""
    shown = masked(url)
    try:
        engine = make_engine(url)
    except (ArgumentError, InvalidRequestError, ImportError, ValueError) as exc:
        raise DatabaseUnavailable(f"cannot use database {shown}: {_reason(exc)}") from exc
    workers = _aiosqlite_workers()
    attempt = 1
    while True:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return engine
        except (DBAPIError, OSError, TimeoutError) as exc:
            if _locked(exc) and attempt < SQLITE_LOCKED_ATTEMPTS:
                await asyncio.sleep(SQLITE_LOCKED_PAUSE_S * attempt)
                attempt += 1
                continue
            await engine.dispose()
            await _settle(_aiosqlite_workers() - workers)
            hint = SQLITE_OPEN_HINT if engine.name == "sqlite" and not _locked(exc) else ""
            raise DatabaseUnavailable(f"cannot open database {shown}: {_reason(exc)}{hint}") from exc


async def open_database(url: str) -> AsyncEngine:
    """Make the engine, check that it connects, migrate, and return it.

    Raises :class:`DatabaseUnavailable` when the URL is unusable, the database cannot be reached
    or opened, or the migration cannot be written (read-only file, missing rights).
    """
    engine = await _connected(url)
    try:
        await _alembic(engine, lambda config: command.upgrade(config, "head"))
    except (DBAPIError, OSError, TimeoutError) as exc:
        await engine.dispose()
        raise DatabaseUnavailable(f"cannot migrate database {masked(url)}: {_reason(exc)}") from exc
    except BaseException:
        await engine.dispose()
        raise
    log.info("database %s ready", masked(url))
    return engine


async def migrate(url: str) -> None:
    """Upgrade the database to the newest migration (``alembic upgrade head``)."""
    engine = await open_database(url)
    await engine.dispose()


async def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database to ``revision``; ``base`` drops every table. For operators and tests."""
    engine = await _connected(url)
    try:
        await _alembic(engine, lambda config: command.downgrade(config, revision))
    finally:
        await engine.dispose()
