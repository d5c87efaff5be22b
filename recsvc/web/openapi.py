"""The OpenAPI 3.1 contract, generated from the msgspec types that validate requests
(and the answer types in recsvc/api.py). `python -m recsvc.web.openapi` prints it;
the checked-in openapi.json must equal it (tests/web/test_openapi.py)."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import msgspec

from features.events import ID_PATTERN, ID_REGEX, MAX_ID_LENGTH
from recsvc.keys import ADMIN, EVENTS, FEATURES, RECOMMEND
from recsvc.web import api

REF = "#/components/schemas/{name}"


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(name=ref)}}}}


def _answer(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, **_json(ref)}


_ERRORS = {
    "400": _answer("invalid input; `error.field` names the field", "ErrorResponse"),
    "408": _answer("the body did not arrive within body_timeout_ms", "ErrorResponse"),
    "413": _answer("body too large", "ErrorResponse"),
    "503": _answer(
        "overloaded: over the admission or in-flight limit (Retry-After)", "ErrorResponse"
    ),
}
SCHEME = "apiKey"
_SECURITY_SCHEMES = {
    SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key holding the operation's scope (recommend, events, "
        "features, admin), as `Authorization: Bearer <key>`. Needed once the service "
        "has API keys configured; without them every operation but /admin is open.",
    }
}
_DENIED = {
    "401": _answer("no API key, or not a configured one (WWW-Authenticate)", "ErrorResponse"),
    "403": _answer("the API key does not hold the operation's scope", "ErrorResponse"),
}
# The scope each operation needs (recsvc.web.routes holds the same table).
_SCOPES = {
    "/v1/recommendations": RECOMMEND,
    "/v1/experiments/{user_id}": RECOMMEND,
    "/v1/events": EVENTS,
    "/v1/users/{user_id}/features": FEATURES,
    "/v1/features": FEATURES,
    "/metrics": ADMIN,
}

_USER = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": ID_PATTERN, "maxLength": MAX_ID_LENGTH},
}
_FLAGS = {
    "name": "X-Recsvc-Flags",
    "in": "header",
    "required": False,
    "description": "force variants where allowed: experiment=variant,other=variant",
    "schema": {"type": "string", "pattern": api.FLAGS_PATTERN},
}

_REQUEST_ID = {
    "name": "X-Request-Id",
    "in": "header",
    "required": False,
    "description": "the caller's request id (1-128 of A-Z a-z 0-9 . _ : -), echoed in the "
    "answer's X-Request-Id and used in logs and experiment logs; generated when absent "
    "(a malformed one is replaced, not refused). Must be unique per request.",
    "schema": {"type": "string"},
}

_ID = {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": MAX_ID_LENGTH}
_IDS = {"type": "array", "items": _ID, "minItems": 1, "maxItems": api.MAX_GET_IDS}
_LABEL = {"type": "string", "maxLength": 64}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


_RECOMMEND_QUERY = [
    _query("user_id", _ID, required=True),
    _query("n", {"type": "integer", "minimum": 1, "maximum": api.MAX_N}),
    _query("candidates", _IDS),
    _query("exclude", _IDS),
    _query("category", _ID),
    _query("page", _LABEL),
    _query("device", _LABEL),
    _query("explain", {"type": "boolean"}),
    _query("explain_top", {"type": "integer", "minimum": 1, "maximum": api.MAX_EXPLAIN_TOP}),
]


def document() -> dict[str, Any]:
    types = [
        api.RecommendRequest,
        api.RecommendResponse,
        api.EventIn,
        api.EventBatch,
        api.EventsResponse,
        api.FeaturesRequest,
        api.FeaturesResponse,
        api.UserFeatures,
        api.ExperimentsResponse,
        api.ErrorResponse,
        api.Health,
        api.Readiness,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    components = _ecma_patterns(components)
    components["EventBatch"]["properties"]["events"]["items"] = {
        "anyOf": [{"$ref": REF.format(name="EventIn")}, {}],
        "description": "an EventIn; an invalid one is listed in `rejected`, the rest apply",
    }
    events_body = {
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": REF.format(name="EventIn")},
                        {"$ref": REF.format(name="EventBatch")},
                    ]
                }
            }
        },
        "required": True,
    }
    paths: dict[str, Any] = {
        "/v1/recommendations": {
            "post": {
                "summary": "Top N items for a user (never an error for a dependency problem)",
                "parameters": [_FLAGS],
                "requestBody": {**_json("RecommendRequest"), "required": True},
                "responses": {"200": _answer("ranked items", "RecommendResponse"), **_ERRORS},
            },
            "get": {
                "summary": "The same, the request in the query string",
                "parameters": [_FLAGS, *_RECOMMEND_QUERY],
                "responses": {"200": _answer("ranked items", "RecommendResponse"), **_ERRORS},
            },
        },
        "/v1/events": {
            "post": {
                "summary": f"One behaviour event or a batch of up to {api.MAX_EVENTS}",
                "requestBody": events_body,
                "responses": {
                    "200": _answer(
                        "accepted, duplicates, rejected, failed (retry)", "EventsResponse"
                    ),
                    **_ERRORS,
                    "409": _answer(
                        "a single event naming an item outside the catalogue (code unknown_item)",
                        "ErrorResponse",
                    ),
                    "503": _answer(
                        "the feature store is unavailable (Retry-After)", "ErrorResponse"
                    ),
                },
            }
        },
        "/v1/users/{user_id}/features": {
            "get": {
                "summary": "A user's online features",
                "parameters": [_USER],
                "responses": {"200": _answer("features", "UserFeatures"), **_ERRORS},
            }
        },
        "/v1/features": {
            "post": {
                "summary": "Features of up to 100 users, and user x item rows",
                "description": (
                    "At most RECSVC_FEATURES_MAX_CELLS (default 2000) user x item rows, "
                    "len(user_ids) x len(item_ids); past it a 400 naming `item_ids`."
                ),
                "requestBody": {**_json("FeaturesRequest"), "required": True},
                "responses": {"200": _answer("features", "FeaturesResponse"), **_ERRORS},
            }
        },
        "/v1/experiments/{user_id}": {
            "get": {
                "summary": "A user's experiment variants, without recommending",
                "parameters": [_USER],
                "responses": {"200": _answer("variants", "ExperimentsResponse"), **_ERRORS},
            }
        },
        "/healthz": {"get": {"summary": "Alive", "responses": {"200": _answer("ok", "Health")}}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition; all workers' counts); "
                "not here but on its own port, without a key, with RECSVC_METRICS_PORT",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Ready for traffic",
                "responses": {
                    "200": _answer("ready or degraded", "Readiness"),
                    "503": _answer("not ready", "Readiness"),
                },
            }
        },
    }
    for path, operations in paths.items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                operation["parameters"] = [*operation.get("parameters", []), _REQUEST_ID]
            scope = _SCOPES.get(path)
            operation["security"] = [{SCHEME: [scope]}] if scope else []
            if scope:
                operation["responses"] = {**operation["responses"], **_DENIED}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recsvc",
            "version": metadata.version("recsvc"),
            "description": "Real-time recommendation serving. Admin routes are not listed.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY_SCHEMES},
    }


def text() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def _ecma_patterns(schema: Any) -> Any:
    """The schema with the id rule in its JSON Schema form: msgspec validates ids
    with ID_REGEX (Python's re) and writes that into the schemas it generates."""
    if isinstance(schema, dict):
        return {
            k: ID_PATTERN if k == "pattern" and v == ID_REGEX else _ecma_patterns(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_ecma_patterns(v) for v in schema]
    return schema


if __name__ == "__main__":
    print(text(), end="")
