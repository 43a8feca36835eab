"""Messages of the bundled sender and the route's id of each of their parts.

``messages`` holds every message the sender took (API traffic and test submits), with its
routing decision; ``message_parts`` finds a message from the (route, message id) its receipts
carry. The observations' match column also names duplicate and superseded matches now; only
its comment says so, and only PostgreSQL keeps comments.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCH_COMMENT = (
    "token, fuzzy, duplicate, superseded (a fuzzy match its token replaced), or none (unsolicited)"
)
PREVIOUS_MATCH_COMMENT = "token, fuzzy, or none (unsolicited)"
STATUS_COMMENT = (
    "accepted, submitted, delivered, undeliverable (a final failed receipt), failed (no route took it)"
)


def _comments() -> bool:
    return bool(op.get_bind().dialect.supports_comments)


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "idempotency_key",
            sa.String(length=128),
            nullable=True,
            comment="The client's key: one message per key.",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "kind",
            sa.String(length=8),
            nullable=False,
            comment="api (traffic) or test (a test case's submit)",
        ),
        sa.Column("test_case_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(length=16), nullable=False, comment="E.164."),
        sa.Column(
            "region", sa.String(length=2), nullable=True, comment="ISO 3166 alpha-2 of the destination."
        ),
        sa.Column("mcc_mnc", sa.String(length=6), nullable=True, comment="Destination network, when known."),
        sa.Column("sender", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column(
            "route",
            sa.String(length=64),
            nullable=True,
            comment="The route that took it (after any failover).",
        ),
        sa.Column(
            "decision",
            sa.JSON(),
            nullable=False,
            comment="Routing decision: route, reason, table version, attempts.",
        ),
        sa.Column("status", sa.String(length=16), nullable=False, comment=STATUS_COMMENT),
        sa.Column("parts", sa.Integer(), nullable=True),
        sa.Column(
            "message_ids", sa.JSON(), nullable=True, comment="The route's message id of each part, in order."
        ),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "receipt_status",
            sa.String(length=16),
            nullable=True,
            comment="The latest receipt's stat: DELIVRD, UNDELIV, ...",
        ),
        sa.Column("receipt_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["test_case_id"], ["test_cases.id"], name=op.f("fk_messages_test_case_id_test_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_messages_idempotency_key")),
    )
    op.create_index(
        "ix_messages_destination_created", "messages", ["destination", "created_at"], unique=False
    )
    op.create_index("ix_messages_created", "messages", ["created_at"], unique=False)
    op.create_table(
        "message_parts",
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False, comment="The route's id of this part."),
        sa.Column("message", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False, comment="1-based."),
        sa.ForeignKeyConstraint(["message"], ["messages.id"], name=op.f("fk_message_parts_message_messages")),
        sa.PrimaryKeyConstraint("route", "message_id", name=op.f("pk_message_parts")),
    )
    op.create_index("ix_message_parts_message", "message_parts", ["message"], unique=False)
    if _comments():
        op.alter_column(
            "observations",
            "match",
            existing_type=sa.String(16),
            existing_nullable=True,
            comment=MATCH_COMMENT,
            existing_comment=PREVIOUS_MATCH_COMMENT,
        )


def downgrade() -> None:
    if _comments():
        op.alter_column(
            "observations",
            "match",
            existing_type=sa.String(16),
            existing_nullable=True,
            comment=PREVIOUS_MATCH_COMMENT,
            existing_comment=MATCH_COMMENT,
        )
    op.drop_index("ix_message_parts_message", table_name="message_parts")
    op.drop_table("message_parts")
    op.drop_index("ix_messages_created", table_name="messages")
    op.drop_index("ix_messages_destination_created", table_name="messages")
    op.drop_table("messages")
