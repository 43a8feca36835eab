"""Result detail, test-case price and error, conversions, API tokens.

Results keep everything correlation decides (the observation, match kind, arrival, flags and
notes), test cases their price and skip or failure reason; conversion feedback and machine API
tokens get their tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _result_columns() -> tuple[sa.Column[Any], ...]:
    return (
        sa.Column(
            "observation_id",
            sa.String(64),
            nullable=True,
            comment="The observation that delivered it, if any.",
        ),
        sa.Column(
            "match_kind", sa.String(8), nullable=True, comment="token or fuzzy (the token did not survive)."
        ),
        sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_part_ms", sa.Float(), nullable=True, comment="First URC to the last part complete."),
        sa.Column("sender_sent", sa.String(16), nullable=True),
        sa.Column(
            "sim_box",
            sa.Boolean(),
            nullable=True,
            comment="A local subscriber number replaced an alphanumeric sender.",
        ),
        sa.Column("parts_expected", sa.Integer(), nullable=True),
        sa.Column(
            "flags",
            sa.JSON(),
            nullable=False,
            server_default="[]",
            comment="late, content_altered, fake_receipt, ...",
        ),
        sa.Column(
            "notes",
            sa.JSON(),
            nullable=False,
            server_default="[]",
            comment="Why things are as they are, in words.",
        ),
    )


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        for column in _result_columns():
            batch.add_column(column)
    with op.batch_alter_table("results") as batch:
        batch.alter_column("flags", server_default=None, existing_type=sa.JSON(), existing_nullable=False)
        batch.alter_column("notes", server_default=None, existing_type=sa.JSON(), existing_nullable=False)
    with op.batch_alter_table("test_cases") as batch:
        batch.add_column(
            sa.Column(
                "price",
                sa.Float(),
                nullable=True,
                comment="What the route charges for this message, counted against budgets.",
            )
        )
        batch.add_column(
            sa.Column(
                "error", sa.Text(), nullable=True, comment="Why the test was skipped or its submit failed."
            )
        )
        batch.alter_column(
            "status",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment="scheduled, submitted, done (a result exists), failed (submit refused), skipped (probe "
            "offline or unregistered at send time: not counted against the route, nothing spent)",
            existing_comment="scheduled, submitted, done, failed",
        )
    op.create_table(
        "conversions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False, comment="The sender's message id."),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("mcc_mnc", sa.String(6), nullable=False),
        sa.Column("converted", sa.Boolean(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversions")),
    )
    op.create_index(
        "ix_conversions_route_network_at", "conversions", ["route", "mcc_mnc", "at"], unique=False
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, comment="SHA-256 hex of the token."),
        sa.Column("role", sa.String(16), nullable=False, comment="viewer, operator or admin"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_table("conversions")
    with op.batch_alter_table("test_cases") as batch:
        batch.alter_column(
            "status",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment="scheduled, submitted, done, failed",
        )
        batch.drop_column("error")
        batch.drop_column("price")
    with op.batch_alter_table("results") as batch:
        for column in reversed(_result_columns()):
            batch.drop_column(column.name)
