"""Instance heartbeats, and which instance claimed a test case for submit.

Several controller instances dispatch tests from one database. Each now keeps a heartbeat row in
``instances`` (renewed with the leader settings' interval, expiring after their ttl) and writes
its id into ``test_cases.claimed_by`` when it claims a test for submit, so a starting instance,
or the leader later, fails only the in-flight submits of instances that are gone, never those of
a live one. Rows claimed before this migration keep ``claimed_by`` NULL and are recovered at
the next start, as before. The downgrade drops the table and the column.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Instance id: host-pid-random."),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    with op.batch_alter_table("test_cases") as batch:
        batch.add_column(
            sa.Column(
                "claimed_by",
                sa.String(length=128),
                nullable=True,
                comment="Instance id of the controller that last claimed it for submit (NULL: claimed "
                "before migration 0008); its in-flight submit is recovered only once that instance is "
                "gone.",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("test_cases") as batch:
        batch.drop_column("claimed_by")
    op.drop_table("instances")
