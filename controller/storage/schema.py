"""The controller's database schema (SQLAlchemy Core): one definition for SQLite and PostgreSQL.

Alembic migrations in ``controller/storage/migrations`` are generated from this metadata; a test
checks that they match it. Times are stored timezone-aware (UTC); durations in milliseconds.
JSON columns hold what the wire contract already defines (an observation, a modem state), so the
database keeps exactly what arrived.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Unicode,
)
from sqlalchemy.engine import Dialect

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, stored as UTC on every backend and always read back aware (UTC).

    SQLite has no time zone type: SQLAlchemy's ``DateTime(timezone=True)`` writes the wall-clock
    time, drops the offset and reads back a naive value (wrong unless it was UTC). Converting to
    UTC on the way in also keeps SQLite's text timestamps in one zone, so they compare and sort
    correctly. Naive datetimes are refused: their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give it a time zone (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.utcoffset() is None else value.astimezone(UTC)


def _ts(name: str, nullable: bool = True) -> Column[datetime]:
    return Column(name, UTCDateTime(), nullable=nullable)


agents = Table(
    "agents",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("state", String(16), nullable=False, comment="online, offline or lost"),
    Column("session", String(64), comment="Session id of the agent process that set the state."),
    Column("version", String(64)),
    _ts("started_at"),
    _ts("status_at", nullable=False),
    _ts("last_seen_at", nullable=False),
    Column("dropped", Integer, nullable=False, default=0),
    Column("invalid_payloads", Integer, nullable=False, default=0),
    Column("health", JSON, comment="The last health payload."),
    Column("clock_offset_ms", Float, comment="Agent clock minus controller clock, from the time exchange."),
    Column("clock_error_ms", Float, comment="Half the round trip of that exchange."),
    _ts("clock_measured_at"),
)

networks = Table(
    "networks",
    metadata,
    Column("mcc_mnc", String(6), primary_key=True),
    Column("country", String(2), comment="ISO 3166 alpha-2."),
    Column("operator", String(128)),
    Column("smsc_addresses", JSON, nullable=False, default=list, comment="Known SMSCs of the operator."),
)

probes = Table(
    "probes",
    metadata,
    Column("imsi", String(16), primary_key=True, comment="A probe is a SIM; it may move between modems."),
    Column("iccid", String(22)),
    Column("msisdn", String(16)),
    Column("mcc_mnc", String(6)),
    Column("agent_id", String(64), ForeignKey("agents.id")),
    Column("modem_id", String(64)),
    Column("connected", Boolean, nullable=False, default=False),
    Column("registration", String(32)),
    Column("signal_dbm", Integer),
    Column("state", JSON, comment="The last modem state payload."),
    _ts("updated_at", nullable=False),
)
Index("ix_probes_agent_modem", probes.c.agent_id, probes.c.modem_id)

probe_events = Table(
    "probe_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _ts("at", nullable=False),
    Column("kind", String(32), nullable=False, comment="sim_moved, sim_changed, ..."),
    Column("imsi", String(16)),
    Column("agent_id", String(64)),
    Column("modem_id", String(64)),
    Column("detail", JSON),
)

#: The modem's signal, registration and connection over time, for the probe page's signal history.
#: Written by ingest when one of them changed (a signal change at most every few minutes per
#: probe), so a chatty modem cannot grow it without bound; rows past a month are pruned.
probe_samples = Table(
    "probe_samples",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("imsi", String(16), nullable=False),
    _ts("at", nullable=False),
    Column("signal_dbm", Integer),
    Column("registration", String(32)),
    Column("connected", Boolean, nullable=False),
)
Index("ix_probe_samples_imsi_at", probe_samples.c.imsi, probe_samples.c.at)

routes = Table(
    "routes",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("connector", JSON, nullable=False, comment="Connector settings (SMPP or HTTP)."),
    Column("prices", JSON, nullable=False, default=dict, comment="Price per message per MCC-MNC."),
    Column("enabled", Boolean, nullable=False, default=True),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("definition", JSON, nullable=False),
    Column("paused", Boolean, nullable=False, default=False),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
)

test_cases = Table(
    "test_cases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("token", String(32), nullable=False, unique=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id")),
    Column("route", String(64), ForeignKey("routes.name"), nullable=False),
    Column("imsi", String(16), ForeignKey("probes.imsi"), nullable=False),
    Column("msisdn", String(16), nullable=False),
    Column("mcc_mnc", String(6), nullable=False),
    Column("sender", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("template", String(32)),
    _ts("scheduled_at", nullable=False),
    _ts("submitted_at"),
    _ts("submit_acked_at"),
    Column("message_id", String(64), comment="The route's id of the submitted message."),
    _ts("deadline_at", nullable=False),
    Column(
        "status",
        String(16),
        nullable=False,
        comment="scheduled, submitting (claimed by the dispatcher, submit in flight), submitted, done (a "
        "result exists), failed (submit refused), skipped (probe offline or unregistered at send time, "
        "or its time missed: not counted against the route, nothing spent)",
    ),
    Column("price", Float, comment="What the route charges for this message, counted against budgets."),
    Column("error", Text, comment="Why the test was skipped or its submit failed."),
    Column(
        "claimed_by",
        String(128),
        comment="Instance id of the controller that last claimed it for submit (NULL: claimed before "
        "migration 0008); its in-flight submit is recovered only once that instance is gone.",
    ),
)
Index("ix_test_cases_imsi_submitted", test_cases.c.imsi, test_cases.c.submitted_at)
Index("ix_test_cases_route_message", test_cases.c.route, test_cases.c.message_id)
#: The scheduler's lookups: due tests (every second), a campaign's recent tests (budgets, pending
#: pairs, template turns), a probe's last test (which probe of a network goes next).
Index("ix_test_cases_status_scheduled", test_cases.c.status, test_cases.c.scheduled_at)
Index("ix_test_cases_campaign_scheduled", test_cases.c.campaign_id, test_cases.c.scheduled_at)
Index("ix_test_cases_imsi_scheduled", test_cases.c.imsi, test_cases.c.scheduled_at)

MATCH_COMMENT = (
    "token, fuzzy, duplicate, superseded (a fuzzy match its token replaced), or none (unsolicited)"
)
MESSAGE_STATUS_COMMENT = (
    "accepted, submitted, delivered, undeliverable (a final failed receipt), failed (no route took it)"
)

observations = Table(
    "observations",
    metadata,
    Column("id", String(64), primary_key=True, comment="The agent's stable observation id."),
    Column("agent_id", String(64), nullable=False),
    Column("modem_id", String(64), nullable=False),
    Column("imsi", String(16)),
    Column("sender", String(32)),
    Column("text", Text),
    Column("smsc", String(24)),
    _ts("urc_at", nullable=False),
    _ts("ingested_at", nullable=False),
    Column("test_case_id", Integer, ForeignKey("test_cases.id")),
    Column(
        "match",
        String(16),
        comment=MATCH_COMMENT,
    ),
    Column("payload", JSON, nullable=False, comment="The observation as it arrived."),
)
Index("ix_observations_imsi_urc", observations.c.imsi, observations.c.urc_at)

receipts = Table(
    "receipts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("route", String(64), nullable=False),
    Column("message_id", String(64), nullable=False),
    Column("status", String(16), nullable=False, comment="DELIVRD, UNDELIV, EXPIRED, ..."),
    Column("error", String(16)),
    _ts("done_at"),
    _ts("received_at", nullable=False),
    Column("raw", JSON),
)
Index("ix_receipts_route_message", receipts.c.route, receipts.c.message_id)

results = Table(
    "results",
    metadata,
    Column("test_case_id", Integer, ForeignKey("test_cases.id"), primary_key=True),
    Column("route", String(64), nullable=False),
    Column("mcc_mnc", String(6), nullable=False),
    Column("delivered", Boolean, nullable=False),
    Column("late", Boolean, nullable=False, default=False),
    Column("latency_ms", Float),
    Column("latency_error_ms", Float),
    Column("route_leg_ms", Float),
    Column("network_leg_ms", Float),
    Column("sender_kept", Boolean),
    Column("sender_received", String(32)),
    Column("content_intact", Boolean),
    Column("content_diff", Text),
    Column("smsc", String(24)),
    Column("smsc_known", Boolean),
    Column("receipt_status", String(16)),
    Column("receipt_honest", Boolean),
    Column("parts", Integer),
    _ts("decided_at", nullable=False),
    Column("observation_id", String(64), comment="The observation that delivered it, if any."),
    Column("match_kind", String(8), comment="token or fuzzy (the token did not survive)."),
    _ts("arrived_at"),
    Column("last_part_ms", Float, comment="First URC to the last part complete."),
    Column("sender_sent", String(16)),
    Column("sim_box", Boolean, comment="A local subscriber number replaced an alphanumeric sender."),
    Column("parts_expected", Integer),
    Column("flags", JSON, nullable=False, default=list, comment="late, content_altered, fake_receipt, ..."),
    Column("notes", JSON, nullable=False, default=list, comment="Why things are as they are, in words."),
)
Index("ix_results_route_network_decided", results.c.route, results.c.mcc_mnc, results.c.decided_at)
#: What the web UI's live feed reads every second: results decided since its last look.
Index("ix_results_decided", results.c.decided_at)

scores = Table(
    "scores",
    metadata,
    Column("route", String(64), primary_key=True),
    Column("mcc_mnc", String(6), primary_key=True),
    _ts("computed_at", nullable=False),
    Column("score", Float),
    Column("results", Integer, nullable=False),
    Column("stats", JSON, nullable=False),
    Column("explanation", JSON, nullable=False),
)

routing_tables = Table(
    "routing_tables",
    metadata,
    Column("version", Integer, primary_key=True),
    _ts("created_at", nullable=False),
    Column("table", JSON, nullable=False),
)

conversions = Table(
    "conversions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, comment="The sender's message id."),
    Column("route", String(64), nullable=False),
    Column("mcc_mnc", String(6), nullable=False),
    Column("converted", Boolean, nullable=False),
    _ts("at", nullable=False),
    _ts("received_at", nullable=False),
)
Index("ix_conversions_route_network_at", conversions.c.route, conversions.c.mcc_mnc, conversions.c.at)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(128), unique=True, comment="The client's key: one message per key."),
    _ts("created_at", nullable=False),
    Column("kind", String(8), nullable=False, comment="api (traffic) or test (a test case's submit)"),
    Column("test_case_id", Integer, ForeignKey("test_cases.id")),
    Column("destination", String(16), nullable=False, comment="E.164."),
    Column("region", String(2), comment="ISO 3166 alpha-2 of the destination."),
    Column("mcc_mnc", String(6), comment="Destination network, when known."),
    Column("sender", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("route", String(64), comment="The route that took it (after any failover)."),
    Column(
        "decision", JSON, nullable=False, comment="Routing decision: route, reason, table version, attempts."
    ),
    Column(
        "status",
        String(16),
        nullable=False,
        comment=MESSAGE_STATUS_COMMENT,
    ),
    Column("parts", Integer),
    Column("message_ids", JSON, comment="The route's message id of each part, in order."),
    _ts("submitted_at"),
    _ts("acked_at"),
    Column("error", Text),
    Column("receipt_status", String(16), comment="The latest receipt's stat: DELIVRD, UNDELIV, ..."),
    _ts("receipt_at"),
)
Index("ix_messages_destination_created", messages.c.destination, messages.c.created_at)
Index("ix_messages_created", messages.c.created_at)

message_parts = Table(
    "message_parts",
    metadata,
    Column("route", String(64), primary_key=True),
    Column("message_id", String(64), primary_key=True, comment="The route's id of this part."),
    Column("message", Integer, ForeignKey("messages.id"), nullable=False),
    Column("part", Integer, nullable=False, comment="1-based."),
)
Index("ix_message_parts_message", message_parts.c.message)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True, comment="SHA-256 hex of the token."),
    Column("role", String(16), nullable=False, comment="viewer, operator or admin"),
    _ts("created_at", nullable=False),
    _ts("last_used_at"),
    Column("revoked", Boolean, nullable=False, default=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False, comment="argon2id hash of the password."),
    Column("role", String(16), nullable=False, comment="viewer, operator or admin"),
    _ts("created_at", nullable=False),
    _ts("last_login_at"),
    Column("disabled", Boolean, nullable=False, default=False),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("key", String(64), primary_key=True, comment="SHA-256 hex of the session cookie."),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    _ts("created_at", nullable=False),
    _ts("last_seen_at", nullable=False),
    _ts("expires_at", nullable=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    _ts("received_at", nullable=False),
    Column("agent_id", String(64)),
    Column("topic", String(256), nullable=False),
    Column("error", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
)

#: APScheduler's job store (``SQLAlchemyJobStore(tablename="scheduler_jobs")``), defined here so that
#: our migrations own it: the columns are exactly the ones APScheduler 3 creates (191 characters is
#: the longest indexable key in MySQL's utf8mb4, Float(25) an 8-byte float). One row per campaign:
#: ``next_run_time`` in seconds since the epoch (UTC), ``job_state`` the pickled job.
scheduler_jobs = Table(
    "scheduler_jobs",
    metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)

#: Leases held by one controller instance at a time (``controller.leader``): ``scheduler`` is the
#: leader's, for the work that must run exactly once (campaign rounds, the deadline sweep, the
#: routing table, clock sync). Taken when free or expired, renewed while held, released (expired
#: at once) on a clean stop; times from the instances' own (NTP'd) clocks.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True, comment="What the lease is for: scheduler."),
    Column("holder", String(128), nullable=False, comment="Instance id of the holder: host-pid-random."),
    _ts("acquired_at", nullable=False),
    _ts("renewed_at", nullable=False),
    _ts("expires_at", nullable=False),
)

#: One row per running controller instance (``controller.instances``), renewed every
#: ``[leader] renew_interval_s``: how the others tell whether the instance that claimed a test for
#: submit is still alive. Deleted on a clean stop; a row that expired is a dead instance (its
#: in-flight submits are recovered by the leader) and is pruned a day later.
instances = Table(
    "instances",
    metadata,
    Column("id", String(128), primary_key=True, comment="Instance id: host-pid-random."),
    _ts("started_at", nullable=False),
    _ts("renewed_at", nullable=False),
    _ts("expires_at", nullable=False),
)

__all__ = [
    "UTCDateTime",
    "agents",
    "api_tokens",
    "campaigns",
    "conversions",
    "dead_letters",
    "instances",
    "leases",
    "metadata",
    "networks",
    "observations",
    "probe_events",
    "probe_samples",
    "probes",
    "receipts",
    "results",
    "routes",
    "routing_tables",
    "scheduler_jobs",
    "scores",
    "test_cases",
    "users",
    "web_sessions",
]
