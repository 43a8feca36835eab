"""Leases: the leader election of several controller instances on one database.

One row per lease (``scheduler``: the leader's, see ``controller/leader.py``), naming its holder
(an instance id) and when it was taken, last renewed and expires. A new table only: nothing
else changes, so the downgrade just drops it (the next start elects a leader again).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False, comment="What the lease is for: scheduler."),
        sa.Column(
            "holder",
            sa.String(length=128),
            nullable=False,
            comment="Instance id of the holder: host-pid-random.",
        ),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )


def downgrade() -> None:
    op.drop_table("leases")
