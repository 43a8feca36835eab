"""The controller's configuration: one TOML file, pydantic models, a description on every field.

The broker settings reuse the agent's model (one way of describing a broker across the project)
and add what only the controller needs: its persistent session and the shared subscription.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from probe_agent.config import BrokerConfig, load_model
from probe_agent.protocol import DEFAULT_PREFIX


class Strict(BaseModel):
    """Config models refuse unknown keys: a typo is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ControllerBrokerConfig(BrokerConfig):
    """The broker, as the controller uses it."""

    client_id: str = Field(
        "probe-fleet-controller",
        description="MQTT client id; the persistent session is kept under it, so keep it stable. Several "
        "controller instances each need their own (the broker drops a connection whose id reconnects).",
    )
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="How long the broker keeps the session (queueing observations) for an absent controller.",
    )
    shared_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Split observations between controller instances ($share/<group>/...); none for one.",
    )


class IngestConfig(Strict):
    """How observations are written."""

    batch_max: int = Field(500, ge=1, description="Most observations written in one transaction.")
    flush_interval_s: float = Field(
        0.05, gt=0, description="Longest an observation waits in memory before it is written, seconds."
    )


class ScoringWeights(Strict):
    """Weights of the score's components; they need not sum to 1 (the score divides by the sum of
    the weights of the components that are known for a pair)."""

    delivery: float = Field(0.45, ge=0, description="Delivery rate (the lower bound of its interval).")
    latency: float = Field(0.12, ge=0, description="Latency p50 / p90 / p99 through the latency curve.")
    sender: float = Field(0.10, ge=0, description="Sender ID kept as sent.")
    content: float = Field(0.08, ge=0, description="Text delivered unaltered.")
    receipts: float = Field(0.10, ge=0, description="Receipts that told the truth (fake ones weigh more).")
    grey: float = Field(0.07, ge=0, description="No grey-route signs (SIM-box sender, foreign SMSC).")
    price: float = Field(0.04, ge=0, description="Cheapness relative to the cheapest route to the network.")
    conversion: float = Field(0.04, ge=0, description="Conversion rate from the sender's feedback.")

    @model_validator(mode="after")
    def _some_weight(self) -> ScoringWeights:
        if sum(self.model_dump().values()) <= 0:
            raise ValueError("at least one weight must be above 0")
        return self


class ScoringConfig(Strict):
    """How results become a score per (route, network)."""

    window_s: float = Field(24 * 3600.0, gt=0, description="Results older than this are not scored, seconds.")
    half_life_s: float = Field(
        6 * 3600.0, gt=0, description="A result this old counts half as much as a new one, seconds."
    )
    min_results: int = Field(
        20, ge=1, description="Fewer results than this in the window: the pair is unknown (no score)."
    )
    keep_scored_share: float = Field(
        0.75,
        gt=0,
        le=1,
        description="A pair scored at the last recompute stays scored while it has at least this share "
        "of min_results (hysteresis: a pair near min_results does not flap between scored and unknown).",
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Level of the delivery rate's interval; its lower bound is scored."
    )
    latency_good_ms: float = Field(5000.0, gt=0, description="Latency that still scores 0.9, ms.")
    latency_half_ms: float = Field(20000.0, gt=0, description="Latency that scores 0.5, ms.")
    fake_receipt_penalty: float = Field(
        5.0, ge=1, description="A fake receipt (claimed delivered, none came) weighs as this many wrong ones."
    )
    min_conversions: int = Field(
        20, ge=1, description="Fewer conversion reports than this in the window: conversion is not scored."
    )
    weights: ScoringWeights = Field(ScoringWeights(), description="Weights of the score's components.")

    @model_validator(mode="after")
    def _latency_curve(self) -> ScoringConfig:
        if self.latency_half_ms <= self.latency_good_ms:
            raise ValueError("latency_half_ms must be above latency_good_ms")
        return self


class RoutingConfig(Strict):
    """How scores become the routing table."""

    exploration_share: float = Field(
        0.05, ge=0, le=0.5, description="Share of a network's traffic split among routes that need measuring."
    )
    backup_share: float = Field(
        0.10, ge=0, lt=1, description="Share of the ranked traffic given to backups, halving down the order."
    )
    margin: float = Field(
        0.05, ge=0, le=1, description="Score by which a challenger must beat the route ahead of it to pass."
    )
    exclude_below: float = Field(
        0.30, ge=0, le=1, description="Scored routes below this get no traffic (unless no route is better)."
    )
    stale_after_s: float = Field(
        6 * 3600.0, gt=0, description="A route whose newest result is older than this is explored, seconds."
    )
    rebuild_interval_s: float = Field(
        60.0,
        gt=0,
        description="How often the scores are recomputed and the table rebuilt (published when it "
        "changed), seconds.",
    )


class ApiConfig(Strict):
    """The REST API (``/api/v1``): where it listens and how much one request may ask for."""

    enabled: bool = Field(True, description="Serve the REST API with the controller.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on; 127.0.0.1 keeps it local (put a TLS proxy in front), 0.0.0.0 all.",
    )
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on; 0 picks a free one.")
    default_page_size: int = Field(50, ge=1, description="Items per page when a list request gives no limit.")
    max_page_size: int = Field(500, ge=1, description="Largest limit a list request may ask for.")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body accepted, bytes; larger ones get 413."
    )
    token_touch_interval_s: float = Field(
        60.0, ge=0, description="A token's last_used_at is written at most this often, seconds."
    )
    health_timeout_s: float = Field(
        2.0, gt=0, description="How long /health waits for the database before reporting it down, seconds."
    )
    shutdown_timeout_s: float = Field(
        5.0, ge=0, description="How long requests in flight may finish when the API stops, seconds."
    )

    @model_validator(mode="after")
    def _page_sizes(self) -> ApiConfig:
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size is above max_page_size")
        return self


class UiConfig(Strict):
    """The web UI for operators, served beside the API (same address): sessions and logins."""

    enabled: bool = Field(True, description="Serve the web UI at / with the API.")
    session_idle_s: float = Field(
        8 * 3600.0, gt=0, description="A login session ends after this long without a request, seconds."
    )
    login_max_failures: int = Field(
        5, ge=1, description="Failed logins per client address or user name before it must wait."
    )
    login_window_s: float = Field(
        300.0, gt=0, description="The window those failures are counted in (and the wait), seconds."
    )
    live_poll_interval_s: float = Field(
        1.0, gt=0, description="How often the live feed (new results, agent changes) looks for news, seconds."
    )
    page_size: int = Field(100, ge=10, le=1000, description="Rows (agents, results, messages) per page.")


class CorrelationConfig(Strict):
    """How observations become results."""

    grace_s: float = Field(
        300.0,
        ge=0,
        description="How long past its deadline an SMS whose token did not survive may still be matched "
        "to its test (as late), seconds. Longer catches more late deliveries, but risks taking other "
        "traffic on the SIM for a test.",
    )
    sweep_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often test cases past their deadline are decided as not delivered, seconds.",
    )


class ScheduleConfig(Strict):
    """The scheduler: campaign rounds (persisted APScheduler jobs) and the dispatch of due tests."""

    enabled: bool = Field(
        True,
        description="Plan and submit tests in this controller. With several controller instances on one "
        "database, set it alike in all: every instance submits due tests (each claimed once), and only "
        "the elected leader ([leader]) runs the campaign rounds.",
    )
    deadline_s: float = Field(
        600.0,
        gt=0,
        le=86400.0,
        description="A test with no SMS this long after its submit is not delivered, seconds; a campaign "
        "may override it.",
    )
    dispatch_interval_s: float = Field(
        1.0, gt=0, le=60.0, description="How often due tests are looked for and submitted, seconds."
    )
    sync_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often the campaign jobs are reconciled with the campaigns table, seconds.",
    )
    misfire_grace_s: float = Field(
        300.0,
        gt=0,
        description="A round due while the controller was stopped still runs if at most this late, "
        "seconds; later, missed rounds are dropped and the campaign waits for its next one.",
    )
    late_submit_s: float = Field(
        60.0,
        gt=0,
        description="A test not submitted within this many seconds of its planned time (controller "
        "stopped) is skipped, not sent late, so a restart does not burst the probes.",
    )
    retry_after_s: float = Field(
        30.0,
        gt=0,
        description="A submit refused with a retryable error is tried once more after this many seconds, "
        "if that is still within the campaign's cadence and allowed hours.",
    )
    submit_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the sender to accept one submit, seconds."
    )
    max_concurrent_submits: int = Field(
        8, ge=1, description="Submits in flight at once, so a slow route does not delay the others."
    )
    dispatch_batch: int = Field(200, ge=1, description="Most due tests taken in one dispatch pass.")


class SenderConfig(Strict):
    """The bundled sender: route connectors (settings stored with each route), number plan and
    country rules."""

    enabled: bool = Field(
        True, description="Run the sender here: connect the routes, submit tests, take POST /messages."
    )
    rules_file: Path | None = Field(
        None, description="Per-country rules (sender types, promotional quiet hours); none: the bundled file."
    )
    prefix_file: Path | None = Field(
        None, description="CSV prefix,mcc_mnc: the network of number ranges, over phonenumbers' carrier data."
    )
    portability_file: Path | None = Field(
        None, description="CSV number,mcc_mnc: ported numbers, over everything else."
    )
    sync_interval_s: float = Field(
        10.0, gt=0, description="How often route changes reach the connectors, seconds."
    )

    @field_validator("rules_file", "prefix_file", "portability_file")
    @classmethod
    def _file_loads(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        """Each file is read now, so a missing one or a bad line is a config error naming it."""
        from controller.sender.numbers import NumberPlan
        from controller.sender.rules import load_rules

        if path is None:
            return None
        try:
            if info.field_name == "rules_file":
                load_rules(path)
            elif info.field_name == "prefix_file":
                NumberPlan.load((), prefix_file=path)
            else:
                NumberPlan.load((), portability_file=path)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        return path


class LeaderConfig(Strict):
    """Leader election between controller instances on one database: a lease row (table ``leases``)
    that one instance holds and renews. The leader alone runs the campaign rounds, the deadline
    sweep, the routing-table rebuild and publish and the clock sync with the agents; every instance
    ingests, dispatches due tests, serves the API and runs its sender. One instance simply leads."""

    ttl_s: float = Field(
        30.0,
        gt=0,
        description="How long a lease lasts without renewal, seconds: a leader that died (no clean stop) "
        "is replaced this long after its last renewal. Every instance's heartbeat (table instances) "
        "lasts as long: the tests an instance that died was submitting are failed, outcome unknown, "
        "by the leader once its heartbeat is this old (plus max_clock_skew_s). Lease times come from "
        "each instance's own clock (keep them NTP-synced): a leader stops leading max_clock_skew_s "
        "before its lease runs out by its own clock, so an instance whose clock is up to that much "
        "ahead cannot take over while it leads.",
    )
    renew_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often the leader renews its lease and the others try to take it, and every "
        "instance renews its heartbeat, seconds; below half of ttl_s. A failed renewal steps the "
        "leader down at once; a lease released by a clean stop is taken over within this interval.",
    )
    max_clock_skew_s: float = Field(
        1.0,
        ge=0,
        description="Largest clock difference between two controller hosts allowed for, seconds (NTP "
        "keeps them within milliseconds); must stay below ttl_s - 2 x renew_interval_s.",
    )

    @model_validator(mode="after")
    def _renewed_in_time(self) -> LeaderConfig:
        if self.renew_interval_s >= self.ttl_s / 2:
            raise ValueError(
                f"renew_interval_s ({self.renew_interval_s:g}) must be below half of ttl_s ({self.ttl_s:g}), "
                "so a leader renews well before its lease can expire"
            )
        if self.max_clock_skew_s >= self.ttl_s - 2 * self.renew_interval_s:
            raise ValueError(
                f"max_clock_skew_s ({self.max_clock_skew_s:g}) must be below ttl_s - 2 x renew_interval_s "
                f"({self.ttl_s - 2 * self.renew_interval_s:g}), so a renewal has a whole renew interval "
                "to complete before the leader must step down"
            )
        return self


class ControllerConfig(Strict):
    """``controller.toml``."""

    database_url: str = Field(
        "sqlite:///probe-fleet.db",
        description="SQLAlchemy URL: sqlite:///path (the default, WAL) or postgresql://user@host/db.",
    )
    broker: ControllerBrokerConfig = Field(description="The MQTT broker.")
    topic_prefix: str = Field(
        DEFAULT_PREFIX, description="Root of the topic tree, with its contract version."
    )
    ingest: IngestConfig = Field(IngestConfig(), description="Observation writing.")
    correlation: CorrelationConfig = Field(CorrelationConfig(), description="Matching and deadlines.")
    scoring: ScoringConfig = Field(ScoringConfig(), description="Route scores per network.")
    routing: RoutingConfig = Field(RoutingConfig(), description="The routing table built from the scores.")
    time_exchange_interval_s: float = Field(
        300.0, gt=0, description="How often each online agent's clock offset is measured, seconds."
    )
    schedule: ScheduleConfig = Field(
        ScheduleConfig(), description="Campaign scheduling and the submit of due tests."
    )
    api: ApiConfig = Field(ApiConfig(), description="The REST API: listen address, paging, tokens.")
    sender: SenderConfig = Field(SenderConfig(), description="The bundled sender.")
    leader: LeaderConfig = Field(
        LeaderConfig(), description="Leader election between several controller instances on one database."
    )
    ui: UiConfig = Field(UiConfig(), description="The web UI: login sessions and throttling.")


def load(path: str | Path) -> ControllerConfig:
    """Read and validate ``controller.toml``; ConfigError names every problem by its field."""
    return load_model(path, ControllerConfig)
