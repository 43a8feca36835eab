"""The OpenAPI document against the code: the checked-in file is what the operations generate, it
lists exactly the live router's (method, path) pairs, it is served without a token, and live
answers (successes and errors) validate against the schemas it gives for them."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from sqlalchemy import insert

from controller.api.app import OPERATIONS, make_app
from controller.api.openapi import CHECKED_IN, build_document, dumps
from controller.api.ops import API_ROOT
from controller.storage import schema as s
from controller.storage.db import make_engine, open_database
from probe_agent.protocol import RouteChoice
from tests.test_api import (
    DEFINITION,
    T0,
    V1,
    Api,
    controller_config,
    route_body,
    running_api,
    seed_test_cases,
    store_table,
    table,
)

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return dict(json.loads(CHECKED_IN.read_text()))


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    engine = await open_database(f"sqlite:///{tmp_path / 'api.db'}")
    try:
        async with running_api(engine) as running:
            yield running
    finally:
        await engine.dispose()


def test_the_checked_in_file_is_what_the_operations_generate(document: dict[str, Any]) -> None:
    generated = dumps(build_document(OPERATIONS))
    assert CHECKED_IN.read_text() == generated, "out of date: run python -m controller.api.openapi"
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)  # raises, naming the problem
        assert schema.get("description") or schema.get("type") != "object" or "properties" not in schema, name
    ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), "operation ids must be unique"


def test_the_document_lists_exactly_the_live_routes(document: dict[str, Any]) -> None:
    app = make_app(make_engine("sqlite://"), controller_config())  # not connected: only the router is read
    live = {
        (route.method.lower(), resource.canonical)
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD" and resource.canonical.startswith(API_ROOT)  # the web UI is not the API
    }
    documented = {
        (method, path) for path, item in document["paths"].items() for method in item if method in METHODS
    }
    assert documented - live == set(), "documented but not served"
    assert live - documented == set(), "served but not documented"
    assert len(live) == len(OPERATIONS) >= 29
    # Path parameters documented are the ones in the path, and nothing else.
    for path, item in document["paths"].items():
        for method, operation in item.items():
            in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert in_path == set(re.findall(r"{(\w+)}", path)), (method, path)
            public = operation.get("security") == []
            # the receipt webhook is checked by its route's shared secret, not a token
            public_paths = ("/api/v1/health", "/api/v1/openapi.json", "/api/v1/receipts/{route}")
            assert public == (path in public_paths), path


def _template(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The documented operation serving a concrete path."""
    path = path.split("?")[0]
    path = path if path.startswith("/api/") else V1 + path
    for template, item in document["paths"].items():
        pattern = "^" + re.sub(r"{\w+}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return dict(item[method.lower()])
    raise AssertionError(f"{method} {path} is not documented")


def check(document: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    """Validate an answer against the schema the document gives for its status."""
    operation = _template(document, method, path)
    responses = operation["responses"]
    assert str(status) in responses or status >= 500, f"{method} {path}: {status} is not documented"
    response = responses.get(str(status), responses["default"])
    if "content" not in response:
        assert body == "", f"{method} {path}: {status} documents no body"
        return
    schema = response["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**schema, "components": document["components"]})
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {errors[0].message} at {list(errors[0].absolute_path)}"


async def test_live_answers_match_their_schemas(api: Api, document: dict[str, Any]) -> None:
    await seed_test_cases(api.engine, 6, routes=("direct-uk", "agg-eu"))
    async with api.engine.begin() as conn:
        await conn.execute(
            insert(s.scores).values(
                route="direct-uk",
                mcc_mnc="23415",
                computed_at=T0,
                score=0.91,
                results=40,
                stats={"delivered": 0.99, "latency_p50_ms": 1800.0},
                explanation={"state": "scored", "score": 0.91, "components": {}, "why": "99% delivered"},
            )
        )
        await conn.execute(
            insert(s.probe_events).values(
                at=T0 + timedelta(minutes=1),
                kind="sim_moved",
                imsi="234150000000001",
                agent_id="pi-uk-1",
                modem_id="m2",
                detail={"from": "m1"},
            )
        )
    choice = RouteChoice(route="direct-uk", weight=1.0, score=0.91, role="primary", reason="best")
    await store_table(api.engine, table(1, {"23415": [choice]}))

    requests: list[tuple[str, str, Any, str | None]] = [
        ("GET", "/health", None, None),
        ("GET", "/agents", None, "viewer"),
        ("GET", "/agents/pi-uk-1", None, "viewer"),
        ("GET", "/probes?connected=true", None, "viewer"),
        ("GET", "/probes/234150000000001", None, "viewer"),
        (
            "POST",
            "/networks",
            {"mcc_mnc": "23415", "country": "GB", "smsc_addresses": ["+447785016005"]},
            "operator",
        ),
        ("POST", "/networks", {"mcc_mnc": "23415"}, "operator"),  # 409
        ("GET", "/networks?limit=1", None, "viewer"),
        ("GET", "/networks/23415", None, "viewer"),
        ("PATCH", "/networks/23415", {"operator": "Vodafone"}, "operator"),
        ("POST", "/routes", route_body("smpp-1"), "operator"),
        ("GET", "/routes?enabled=true&limit=2", None, "viewer"),
        ("GET", "/routes/smpp-1", None, "viewer"),
        ("PATCH", "/routes/smpp-1", {"enabled": False}, "operator"),
        ("POST", "/campaigns", {"name": "uk", "definition": DEFINITION}, "operator"),
        (
            "POST",
            "/campaigns",
            {"name": "x", "definition": {**DEFINITION, "cadence_s": -1}},
            "operator",
        ),  # 400
        ("GET", "/campaigns", None, "viewer"),
        ("GET", "/campaigns/2", None, "viewer"),
        ("PATCH", "/campaigns/2", {"name": "uk-2"}, "operator"),
        ("POST", "/campaigns/2/pause", None, "operator"),
        ("POST", "/campaigns/2/resume", None, "operator"),
        ("GET", "/test-cases?limit=2", None, "viewer"),
        ("GET", "/test-cases/2", None, "viewer"),
        ("GET", "/results?delivered=true", None, "viewer"),
        ("GET", "/scores", None, "viewer"),
        ("GET", "/routing-table", None, "viewer"),
        ("GET", "/routing-table/versions", None, "viewer"),
        ("GET", "/routing-table/versions/1", None, "viewer"),
        ("GET", "/openapi.json", None, None),
        ("GET", "/networks", None, None),  # 401
        ("POST", "/networks", {"mcc_mnc": "23410"}, "viewer"),  # 403
        ("GET", "/campaigns/999", None, "viewer"),  # 404
        ("DELETE", "/campaigns/2", None, "operator"),  # 204
        ("DELETE", "/networks/23415", None, "operator"),  # 204
        ("DELETE", "/routes/direct-uk", None, "operator"),  # 409: test cases
        ("DELETE", "/routes/smpp-1", None, "operator"),  # 204
    ]
    statuses = set()
    for method, path, body, role in requests:
        status, answer, _ = await api.call(method, path, role=role, body=body)
        assert status < 500, (method, path, answer)
        check(document, method, path, status, answer)
        statuses.add(status)
    assert statuses == {200, 201, 204, 400, 401, 403, 404, 409}
    served = (await api.call("GET", "/openapi.json", role=None))[1]
    assert served == document


async def test_every_list_takes_its_documented_paging(api: Api, document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        operation = item.get("get", {})
        names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if not {"limit", "cursor"} <= names:
            continue
        status, body, _ = await api.call("GET", f"{path}?limit=1", role="viewer")
        assert status == 200, (path, body)
        check(document, "GET", path, status, body)
        assert body["limit"] == 1 and body["next"] is None and body["total"] == 0
