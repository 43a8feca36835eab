"""The controller's configuration: one TOML file, pydantic models, a description on every field.

The broker settings reuse the agent's model (one way of describing a broker across the project)
and add what only the controller needs: its persistent session and the shared subscription.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from probe_agent.config import BrokerConfig, load_model
from probe_agent.protocol import DEFAULT_PREFIX


class Strict(BaseModel):
    """Config models refuse unknown keys: a typo is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ControllerBrokerConfig(BrokerConfig):
    """The broker, as the controller uses it."""

    client_id: str = Field(
        "probe-fleet-controller",
        description="MQTT client id; the persistent session is kept under it, so keep it stable.",
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
    time_exchange_interval_s: float = Field(
        300.0, gt=0, description="How often each online agent's clock offset is measured, seconds."
    )


def load(path: str | Path) -> ControllerConfig:
    """Read and validate ``controller.toml``; ConfigError names every problem by its field."""
    return load_model(path, ControllerConfig)
