"""The OpenAPI contract: generated from the request types, checked in without drift,
valid OpenAPI 3.1, honoured by live answers, and readable at /docs offline."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from features.candidates import SOURCES
from recsvc.web import api, openapi

CHECKED_IN = Path(__file__).resolve().parents[2] / "openapi.json"
Client = TestClient[Any, Any]


def test_the_checked_in_contract_is_the_generated_one() -> None:
    assert CHECKED_IN.read_text() == openapi.text(), "regenerate: python -m recsvc.web.openapi"


def test_the_contract_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    request = doc["components"]["schemas"]["RecommendRequest"]
    n_schema = request["properties"]["n"]["anyOf"][0]  # integer, or null for the default
    assert (n_schema["minimum"], n_schema["maximum"]) == (1, api.MAX_N)  # the validating limits
    assert request["additionalProperties"] is False


@pytest.mark.asyncio
async def test_live_answers_follow_the_contract(client: Client) -> None:
    served = await (await client.get("/openapi.json")).json()
    assert served == json.loads(CHECKED_IN.read_text())

    async def conforms(method: str, path: str, kind: type[Any], **kw: Any) -> Any:
        resp = await client.request(method, path, **kw)
        return msgspec.convert(await resp.json(), kind)

    model = await conforms(
        "POST", "/v1/recommendations", api.RecommendResponse, json={"user_id": "u1"}
    )
    assert model.strategy == "model" and model.items
    fallback = await conforms(
        "POST", "/v1/recommendations", api.RecommendResponse, json={"user_id": "nobody"}
    )
    assert fallback.fallback_reason == "unknown_user"
    event = {"event_id": "oa-1", "user_id": "u1", "item_id": "i1", "type": "view"}
    assert (await conforms("POST", "/v1/events", api.EventsResponse, json=event)).accepted == 1
    features = await conforms(
        "POST",
        "/v1/features",
        api.FeaturesResponse,
        json={"user_ids": ["u1"], "item_ids": ["i1"]},
    )
    assert features.users[0].known
    await conforms("GET", "/v1/users/u1/features", api.UserFeatures)
    await conforms("GET", "/v1/experiments/u1", api.ExperimentsResponse)
    await conforms("GET", "/readyz", api.Readiness)
    await conforms("GET", "/healthz", api.Health)
    error = await conforms("POST", "/v1/recommendations", api.ErrorResponse, json={"n": 5})
    assert error.error.field == "user_id"


@pytest.mark.asyncio
async def test_docs_page_renders_from_local_files(client: Client) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'fetch("/openapi.json")' in page
    # No CDN: nothing loaded from another host.
    assert not re.search(r'(src|href)="https?://', page)
    assert "<script src=" not in page


@pytest.mark.asyncio
async def test_demo_page_is_served_from_local_files(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'call("/v1/recommendations"' in page and 'call("/metrics")' in page
    assert "sessionStorage" in page  # a key, when one is needed, stays in the tab
    assert not re.search(r'(src|href)="https?://', page)
    assert "<script src=" not in page


def test_the_answer_names_every_candidate_source() -> None:
    """The API's source literal is written out for msgspec and mypy; it must list
    exactly the candidate sources, plus the default strategy's category list."""
    source = typing.get_type_hints(api.ItemOut)["source"]
    assert typing.get_args(source) == (*SOURCES, "category_popular")
