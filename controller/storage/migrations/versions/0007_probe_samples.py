"""Probe samples: each probe's signal, registration and connection over time.

Until now only a probe's last modem state was kept (``probes``). ``probe_samples`` keeps a row
each time one of them changed (a signal change at most every few minutes), indexed by
(imsi, at) for the probe page's signal history and for pruning a probe's old rows. A new table
only: the downgrade drops it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "probe_samples",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("imsi", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signal_dbm", sa.Integer(), nullable=True),
        sa.Column("registration", sa.String(length=32), nullable=True),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_probe_samples")),
    )
    op.create_index("ix_probe_samples_imsi_at", "probe_samples", ["imsi", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_probe_samples_imsi_at", table_name="probe_samples")
    op.drop_table("probe_samples")
