"""The agent's configuration: one TOML file, one pydantic model, a description on every field.

``probe-agent check --config agent.toml`` validates it without touching hardware and names every
failing field. Secrets can come from files (``password_file``, ``pin_file``) so the TOML itself
can be world-readable; the Ansible role writes those files with tight permissions.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from hardware.modem_profiles import PROFILES, get_profile
from probe_agent.protocol import DEFAULT_PREFIX, ID_PATTERN

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Config models refuse unknown keys: a typo is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Strict):
    """TLS to the broker."""

    ca: Path = Field(description="CA certificate (PEM) that signed the broker's certificate.")
    cert: Path | None = Field(None, description="Client certificate (PEM), for certificate authentication.")
    key: Path | None = Field(None, description="Client private key (PEM); required with `cert`.")

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        return self


class BrokerConfig(Strict):
    """The MQTT broker the agent reports to."""

    host: str = Field(description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version; 3.1.1 for brokers without MQTT 5 (the embedded demo broker)."
    )
    username: str | None = Field(None, description="User name; by convention the agent id.")
    password: SecretStr | None = Field(None, description="Password; prefer `password_file`.")
    password_file: Path | None = Field(None, description="File holding the password (first line).")
    tls: TlsConfig | None = Field(None, description="TLS settings; none means plain TCP.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval, seconds.")
    reconnect_initial_s: float = Field(1.0, gt=0, description="First reconnect delay, seconds.")
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay (with jitter), seconds.")

    @model_validator(mode="after")
    def _one_password(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for this broker (CA, and the client certificate when set); None for TCP."""
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        if self.tls.cert is not None and self.tls.key is not None:
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        return context

    def secret(self) -> str | None:
        """The password, read from its file when configured that way."""
        if self.password_file is not None:
            return self.password_file.read_text().splitlines()[0] if self.password_file.exists() else None
        return self.password.get_secret_value() if self.password else None


class SpoolConfig(Strict):
    """The durable outbox: observations wait here until the broker acknowledged them."""

    path: Path = Field(Path("/var/lib/probe-agent/spool.db"), description="SQLite file of the spool.")
    max_entries: int = Field(
        100_000, ge=10, description="Most observations kept; beyond it the oldest are dropped and counted."
    )


class LogConfig(Strict):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe level logged."
    )
    json_lines: bool = Field(False, alias="json", description="One JSON object per line instead of text.")


class ClockConfig(Strict):
    """Where the agent's clock estimate comes from."""

    chronyc: str | None = Field(
        "chronyc", description="chronyc binary to read chrony's tracking offset; empty to not use chrony."
    )
    shift_s: float = Field(
        0.0,
        ge=-86400.0,
        le=86400.0,
        description="Emulation only (simnet's demo and tests): add this many seconds to the system clock "
        "in everything the agent stamps, as on a Pi whose clock is off. Leave 0 on a real Pi.",
    )


class ModemConfig(Strict):
    """One modem and its SIM."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Modem id, unique on this agent.")
    port: str = Field(description="Serial port: the stable udev name, e.g. /dev/gsm/modem-a.")
    profile: str | None = Field(None, description="Modem model: " + ", ".join(sorted(PROFILES)) + ".")
    pin: SecretStr | None = Field(None, description="SIM PIN; prefer `pin_file`.")
    pin_file: Path | None = Field(None, description="File holding the SIM PIN.")
    expected_mcc_mnc: str | None = Field(
        None, pattern=r"^\d{5,6}$", description="Network the SIM should register on (MCC+MNC)."
    )
    msisdn: str | None = Field(None, pattern=r"^\+[1-9]\d{6,14}$", description="The SIM's number, E.164.")
    hard_reset_command: list[str] | None = Field(
        None, description="Command run when a soft reset does not help, e.g. a USB power cycle."
    )
    poll_interval_s: float = Field(
        30.0, gt=0, description="How often signal, registration and storage are read."
    )
    direct_delivery: bool = Field(False, description="Have SMS routed to the agent (+CMT) instead of stored.")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        if value is not None:
            get_profile(value)  # ValueError naming the known profiles
        return value

    @model_validator(mode="after")
    def _one_pin(self) -> ModemConfig:
        if self.pin is not None and self.pin_file is not None:
            raise ValueError("set pin or pin_file, not both")
        return self

    def secret_pin(self) -> str | None:
        """The PIN, read from its file when configured that way."""
        if self.pin_file is not None:
            return self.pin_file.read_text().strip() if self.pin_file.exists() else None
        return self.pin.get_secret_value() if self.pin else None


class AgentConfig(Strict):
    """``agent.toml``: everything one probe agent needs."""

    agent_id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(
        description="This agent's id; a topic level, so letters, digits, _ . - only."
    )
    broker: BrokerConfig = Field(description="The MQTT broker.")
    topic_prefix: str = Field(
        DEFAULT_PREFIX, description="Root of the topic tree, with the contract version."
    )
    heartbeat_interval_s: float = Field(30.0, gt=0, description="How often health is published, seconds.")
    spool: SpoolConfig = Field(SpoolConfig(), description="The durable outbox.")
    log: LogConfig = Field(LogConfig(), description="Logging.")
    clock: ClockConfig = Field(ClockConfig(), description="Clock estimate.")
    modems: list[ModemConfig] = Field(default_factory=list, description="The modems on this Pi.")

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        for what, values in (("id", [m.id for m in self.modems]), ("port", [m.port for m in self.modems])):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"modem {what}s must be unique: {', '.join(dupes)} repeated")
        return self


def missing_files(config: AgentConfig) -> list[str]:
    """Files the config names that do not exist, one problem line each (checked by ``check``)."""
    problems = []
    tls = config.broker.tls
    named: list[tuple[str, Path | None]] = [("broker.password_file", config.broker.password_file)]
    if tls is not None:
        named += [("broker.tls.ca", tls.ca), ("broker.tls.cert", tls.cert), ("broker.tls.key", tls.key)]
    named += [(f"modems.{i}.pin_file", m.pin_file) for i, m in enumerate(config.modems)]
    for field, path in named:
        if path is not None and not path.is_file():
            problems.append(f"{field}: file {path} not found")
    return problems


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one line per failing field."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


def load(path: str | Path) -> AgentConfig:
    """Read and validate ``agent.toml``; ConfigError names every problem by its field."""
    return load_model(path, AgentConfig)


def load_model(path: str | Path, model: type[M]) -> M:
    """Read a TOML file into ``model``; ConfigError names every problem by its dotted field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(e) for e in exc.errors()]) from None


def _describe(error: ErrorDetails) -> str:
    loc = error.get("loc") or ()
    field = ".".join(str(x) for x in loc) if isinstance(loc, tuple) else str(loc)
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        message = "unknown setting"
    return f"{field or '(top level)'}: {message}"
