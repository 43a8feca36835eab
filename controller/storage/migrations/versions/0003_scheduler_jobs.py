"""Scheduler jobs, the scheduler's indexes on test cases, and their submitting status.

APScheduler's job store gets its table from our migrations (the store finds it and creates
none): exactly the columns APScheduler 3 defines. Test cases get the indexes the scheduler's
lookups need (due tests, a campaign's recent tests, a probe's last test), and the transient
status ``submitting``, a test claimed by the dispatcher whose submit is in flight; only the
column comment says so, and only PostgreSQL keeps comments (SQLite has none: nothing to change).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS_COMMENT = (
    "scheduled, submitting (claimed by the dispatcher, submit in flight), submitted, done (a "
    "result exists), failed (submit refused), skipped (probe offline or unregistered at send time, "
    "or its time missed: not counted against the route, nothing spent)"
)
PREVIOUS_STATUS_COMMENT = (
    "scheduled, submitted, done (a result exists), failed (submit refused), skipped (probe "
    "offline or unregistered at send time: not counted against the route, nothing spent)"
)

INDEXES = {
    "ix_test_cases_status_scheduled": ["status", "scheduled_at"],
    "ix_test_cases_campaign_scheduled": ["campaign_id", "scheduled_at"],
    "ix_test_cases_imsi_scheduled": ["imsi", "scheduled_at"],
}


def _comments() -> bool:
    return bool(op.get_bind().dialect.supports_comments)


def upgrade() -> None:
    op.create_table(
        "scheduler_jobs",
        sa.Column("id", sa.Unicode(length=191), nullable=False),
        sa.Column("next_run_time", sa.Float(precision=25), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_jobs")),
    )
    op.create_index(
        op.f("ix_scheduler_jobs_next_run_time"), "scheduler_jobs", ["next_run_time"], unique=False
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "test_cases", columns, unique=False)
    if _comments():
        op.alter_column(
            "test_cases",
            "status",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment=STATUS_COMMENT,
            existing_comment=PREVIOUS_STATUS_COMMENT,
        )


def downgrade() -> None:
    if _comments():
        op.alter_column(
            "test_cases",
            "status",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment=PREVIOUS_STATUS_COMMENT,
            existing_comment=STATUS_COMMENT,
        )
    for name in reversed(INDEXES):
        op.drop_index(name, table_name="test_cases")
    op.drop_index(op.f("ix_scheduler_jobs_next_run_time"), table_name="scheduler_jobs")
    op.drop_table("scheduler_jobs")
