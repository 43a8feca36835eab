"""Database fixtures: every storage test runs on SQLite and on PostgreSQL, each time on a fresh
database.

``database_url`` is parametrized over ``sqlite`` (a file in the test's tmp dir) and
``postgresql`` (a database with a unique name on the local server, created through asyncpg and
dropped afterwards). PostgreSQL is part of this machine, like mosquitto: when it cannot be
reached the test fails and says so, it is not skipped. ``database`` is the same database opened
and migrated by the controller's own ``open_database``.

Use them from a test module by importing them and listing them in its ``__all__`` (as
tests/test_storage.py does, which keeps ruff from calling them unused or redefined), or for
every module with ``pytest_plugins = ("tests.db",)`` in tests/conftest.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.storage.db import masked, open_database

#: The server's maintenance database, where test databases are created and dropped.
PG_ADMIN_URL = os.environ.get("PROBE_FLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_CONNECT_TIMEOUT_S = 10.0


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_ADMIN_URL, timeout=PG_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        error = exc
    pytest.fail(
        f"PostgreSQL at {masked(PG_ADMIN_URL)} is not reachable ({error!r}). The storage tests run "
        "on it: start the server on this machine (or set PROBE_FLEET_TEST_POSTGRES to another one).",
        pytrace=False,
    )


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for the duration of the block; yields its URL."""
    name = f"pf_test_{uuid.uuid4().hex[:16]}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await _admin()
        try:
            # FORCE: a test that failed before disposing its engine must not leave the database.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a fresh, empty database: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The database at ``database_url``, opened and migrated; disposed after the test."""
    engine = await open_database(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()
