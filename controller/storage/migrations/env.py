"""Alembic environment of the controller's migrations, on the async engines (SQLite, PostgreSQL).

At start, ``controller.storage.db`` runs Alembic on a connection it has opened, locked and put
in a transaction, passed in ``config.attributes["connection"]``; this file then only migrates on
it (Alembic's run_sync recipe). From the alembic command line (see ``alembic.ini``) there is no
connection: the URL comes from ``-x url=...`` and the same lock and transaction are taken here.
SQLite cannot alter most of a table in place, so its migrations are written and run in batch
mode (a new table, a copy, a rename).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from controller.storage import db
from controller.storage.schema import UTCDateTime, metadata

config = context.config


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Write the schema's own column types as plain SQLAlchemy ones: a migration is a snapshot
    and must not import application code that may change after it."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations on a connection (within the caller's transaction, if any)."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def command_line_url() -> str:
    """The database named on the alembic command line."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("name the database: alembic -c .../alembic.ini -x url=sqlite:///dev.db ...")
    return url


async def run_from_command_line(url: str) -> None:
    """Migrate the database at ``url`` under the controller's migration lock."""
    engine = db.make_engine(url)
    try:
        await db.run_exclusive(engine, run_migrations)
    finally:
        await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    if context.is_offline_mode():  # --sql: write the SQL for a DBA instead of running it
        url = db.async_url(command_line_url())
        context.configure(
            url=url,
            target_metadata=metadata,
            literal_binds=True,
            render_as_batch=url.startswith("sqlite"),
            render_item=render_item,
        )
        with context.begin_transaction():
            context.run_migrations()
    else:
        asyncio.run(run_from_command_line(command_line_url()))
