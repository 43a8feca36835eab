"""The wire contract: every topic built and parsed by the one module, every payload model with a
golden payload, unknown fields ignored, invalid payloads named precisely."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from probe_agent.protocol import (
    PAYLOADS,
    AgentStatus,
    ClockState,
    CommandRequest,
    CommandResponse,
    ControllerStatus,
    Health,
    InvalidPayload,
    ModemState,
    Observation,
    RouteChoice,
    RoutingTable,
    SimIdentity,
    Topic,
    Topics,
    decode,
)

NOW = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
T = Topics()

GOLDEN = {
    "status": (
        T.status("pi-uk-1"),
        AgentStatus(
            state="online", agent="pi-uk-1", session="s1", version="0.1.0", started_at=NOW, at=NOW, uptime_s=1
        ),
    ),
    "modem_state": (
        T.modem_state("pi-uk-1", "modem-a"),
        ModemState(
            agent="pi-uk-1", modem="modem-a", port="/dev/gsm/modem-a", connected=True, mcc_mnc="23415"
        ),
    ),
    "health": (
        T.health("pi-uk-1"),
        Health(agent="pi-uk-1", at=NOW, spool_depth=3, dropped=0, reconnects=1, clock=ClockState()),
    ),
    "sms": (
        T.sms("pi-uk-1"),
        Observation(
            id="abc",
            agent="pi-uk-1",
            modem="modem-a",
            sim=SimIdentity(imsi="234150000000001"),
            sender="MyBank",
            sender_type="alphanumeric",
            text="Grüße 😀",
            smsc="+447785016005",
            scts=datetime(2026, 11, 26, 11, 0, 0, tzinfo=timezone(timedelta(hours=1))),
            urc_at=NOW,
            completed_at=NOW,
            parts=1,
            total_parts=1,
            partial=False,
            origin="cmti",
            pdus=["00"],
            clock=ClockState(offset_ms=1.5, error_ms=0.5, source="chrony", since_sync_s=12),
            software_version="0.1.0",
        ),
    ),
    "request": (T.request("pi-uk-1", "time"), CommandRequest(transaction="t1", data={"t1": NOW.isoformat()})),
    "response": (T.response("pi-uk-1", "time"), CommandResponse(transaction="t1", status="ok", data={})),
    "controller_status": (T.controller_status(), ControllerStatus(state="online", session="c1", at=NOW)),
    "routing_table": (
        T.routing_table(),
        RoutingTable(
            version=3,
            created_at=NOW,
            exploration_share=0.05,
            networks={
                "23415": [
                    RouteChoice(route="direct", weight=0.95, score=0.91, role="primary", reason="best score"),
                    RouteChoice(route="grey", weight=0.05, score=None, role="exploration", reason="unknown"),
                ]
            },
        ),
    ),
}


def test_every_topic_has_a_golden_payload() -> None:
    assert set(GOLDEN) == set(PAYLOADS)


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_topic_and_payload_round_trip(kind: str) -> None:
    topic, payload = GOLDEN[kind]
    parsed, decoded = decode(T, topic, payload.to_json())
    assert parsed.kind == kind and decoded == payload
    assert type(decoded) is PAYLOADS[kind]


def test_parse_extracts_the_ids() -> None:
    assert T.parse("pf/v1/agents/pi-uk-1/modems/modem-a/state") == Topic("modem_state", "pi-uk-1", "modem-a")
    assert T.parse("pf/v1/agents/pi-uk-1/request/modem-reset") == Topic(
        "request", "pi-uk-1", command="modem-reset"
    )
    assert T.parse("pf/v1/agents/pi-uk-1/sms") == Topic("sms", "pi-uk-1")
    assert T.parse("pf/v2/agents/pi-uk-1/sms") is None
    assert T.parse("pf/v1/agents/pi/uk/sms") is None
    assert Topics("fleet/eu/pf/v1").sms("a") == "fleet/eu/pf/v1/agents/a/sms"


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "", "has space", "x" * 65])
def test_ids_that_cannot_be_topic_levels_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        T.sms(bad)


@pytest.mark.parametrize("prefix", ["", "/pf", "pf/", "pf/+/v1"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix)


def test_receivers_ignore_unknown_fields() -> None:
    topic, payload = GOLDEN["status"]
    data = json.loads(payload.to_json())
    data["added_in_v1_5"] = {"anything": True}
    _, decoded = decode(T, topic, json.dumps(data).encode())
    assert decoded == payload


@pytest.mark.parametrize(
    ("topic", "payload", "named"),
    [
        (T.status("a"), b'{"state": "sleeping"}', "state"),
        (T.sms("a"), b"not json", "payload"),
        (T.health("a"), b'{"agent": "a", "at": "2026-11-26T10:00:00"}', "at"),  # a time without zone
        (T.request("a", "time"), b'{"data": {}}', "transaction"),
        ("elsewhere/x", b"{}", "not a topic"),
    ],
)
def test_invalid_payloads_name_the_field_and_topic(topic: str, payload: bytes, named: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        decode(T, topic, payload)
    assert named in str(info.value) and info.value.topic == topic


def test_times_are_rfc3339_utc_and_text_is_utf8() -> None:
    _, payload = GOLDEN["sms"]
    raw = payload.to_json()
    data = json.loads(raw)
    assert data["urc_at"] == "2026-11-26T10:00:00.123456Z"
    assert data["scts"] == "2026-11-26T11:00:00+01:00"  # the SMSC's own zone, kept
    assert data["text"] == "Grüße 😀"


def test_every_payload_field_is_documented() -> None:
    """The contract is documented by its models: a description on every field."""
    from probe_agent.protocol import SimIdentity, TimeRequestData, TimeResponseData

    models = [*PAYLOADS.values(), ClockState, SimIdentity, TimeRequestData, TimeResponseData]
    undocumented = [
        f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description
    ]
    assert undocumented == []
