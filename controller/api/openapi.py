"""The OpenAPI 3.1 document, written from the operations and their pydantic models.

``controller/api/openapi.json`` is the document checked in for clients and reviewers; a test
fails when it differs from what this module writes, or from the live router. Refresh it with
``python -m controller.api.openapi``. The API serves the same document at
``/api/v1/openapi.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from controller.api.errors import ErrorBody
from controller.api.ops import API_ROOT, Operation
from controller.routing import CSV_FIELDS

CHECKED_IN = Path(__file__).resolve().with_name("openapi.json")
REF = "#/components/schemas/{model}"
#: Version of this document's API (the ``v1`` in the path); additive changes keep it.
API_VERSION = "1"

_ERRORS = {
    400: "Bad request: the error names the field, query parameter or path part at fault.",
    401: "No token, or an unknown or revoked one (with WWW-Authenticate: Bearer); for a webhook, a "
    "missing or wrong shared secret.",
    403: "The token's role may not do this.",
    404: "No such object.",
    409: "Conflicts with what is stored (a duplicate name, an object still referred to).",
    413: "The request body is larger than the server accepts.",
    415: "The body is in a form this operation does not read.",
    503: "The database is unreachable; for messages, no sender or no route can take one now.",
}
#: Where each (model, mode) schema is, as pydantic's models_json_schema answers.
Refs = Mapping[tuple[type[Any], str], dict[str, Any]]
_SUCCESS = {200: "OK", 201: "Created", 204: "Done; no content"}


def _models(operations: Iterable[Operation]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for op in operations:
        if op.response is not None:
            pairs.append((op.response, "serialization"))
        pairs.extend((model, "serialization") for model in op.other.values())
        if op.body is not None:
            pairs.append((op.body, "validation"))
    return list(dict.fromkeys(pairs))


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter's schema without its null branch: a query string cannot send
    null, leaving the parameter out is how it is not given."""
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        others = [b for b in branches if b != {"type": "null"}]
        if len(others) == 1 and len(others) < len(branches):
            rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
            return {**others[0], **rest}
    return schema


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, ref_template=REF, mode="validation")
    schemas.update(schema.get("$defs", {}))
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = _without_null(dict(prop))
        description = prop.pop("description", "")
        prop.pop("title", None)
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "description": description,
                "schema": prop,
            }
        )
    return parameters


def _json(ref: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": ref}}


def _error(status: int, error_ref: dict[str, Any]) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": _json(error_ref)}


def _operation(op: Operation, refs: Refs, schemas: dict[str, Any]) -> Any:
    error_ref = refs[(ErrorBody, "serialization")]
    parameters = [
        {"name": name, "in": "path", "required": True, **param} for name, param in op.path_params.items()
    ]
    if op.query is not None:
        parameters += _query_parameters(op.query, schemas)
    success: dict[str, Any] = {"description": _SUCCESS[op.status]}
    if op.status != 204:
        schema = refs[(op.response, "serialization")] if op.response else {"type": "object"}
        success["content"] = _json(schema)
    if op.csv:
        success["content"]["text/csv"] = {
            "schema": {
                "type": "string",
                "description": f"CSV with the header {','.join(CSV_FIELDS)}",
            }
        }
    if op.conditional:
        success["headers"] = {
            "ETag": {"description": "Strong ETag of this representation.", "schema": {"type": "string"}}
        }
    responses: dict[str, Any] = {str(op.status): success}
    if op.conditional:
        responses["304"] = {"description": "Not modified: If-None-Match named the current ETag."}
    statuses = [400] + ([401, 403] if op.role else []) + list(op.errors) + ([413] if op.body else [])
    for status in sorted(set(statuses)):
        responses[str(status)] = _error(status, error_ref)
    for status, model in op.other.items():
        responses[str(status)] = {
            "description": _ERRORS.get(status, model.__doc__ or ""),
            "content": _json(refs[(model, "serialization")]),
        }
    responses["default"] = {
        "description": "Unexpected error (500), database unavailable (503).",
        "content": _json(error_ref),
    }
    doc = (op.handler.__doc__ or "").strip()
    if op.role is not None:
        doc += f"\n\nNeeds a token with role {op.role} or above."
    entry: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": doc,
        "tags": [op.tag],
    }
    if parameters:
        entry["parameters"] = parameters
    if op.body is not None:
        entry["requestBody"] = {"required": True, "content": _json(refs[(op.body, "validation")])}
    entry["responses"] = responses
    if op.role is None:
        entry["security"] = []
    return entry


def build_document(operations: Sequence[Operation]) -> dict[str, Any]:
    """The OpenAPI document of ``operations``."""
    found, definitions = models_json_schema(_models(operations), ref_template=REF)
    refs: Refs = {(model, mode): ref for (model, mode), ref in found.items()}
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.full_path, {})[op.method.lower()] = _operation(op, refs, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "probe-fleet controller API",
            "version": API_VERSION,
            "description": (
                "Agents, probes, networks, routes, campaigns, test cases, results, scores and the routing "
                f"table of a probe-fleet controller, under {API_ROOT}. Times are RFC 3339 UTC, durations "
                "are in milliseconds (_ms). Lists are paged with limit and an opaque cursor. Errors are "
                '{"error", "field", "problems"}.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `probe-fleet token add NAME --role viewer|operator|admin`.",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def dumps(document: dict[str, Any]) -> str:
    """The document as the checked-in file has it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document to controller/api/openapi.json (or check that it is current)."""
    from controller.api.app import OPERATIONS

    parser = argparse.ArgumentParser(prog="python -m controller.api.openapi", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in file is out of date")
    args = parser.parse_args(argv)
    text = dumps(build_document(OPERATIONS))
    if args.check:
        current = CHECKED_IN.read_text() if CHECKED_IN.exists() else ""
        if current != text:
            print(f"{CHECKED_IN} is out of date: run python -m controller.api.openapi", file=sys.stderr)
            return 1
        return 0
    CHECKED_IN.write_text(text)
    print(f"wrote {CHECKED_IN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
