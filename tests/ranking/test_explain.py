"""Explanations: per returned item, LightGBM TreeSHAP contributions that add up to
the item's score, through the real HTTP API."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from features.schema import FEATURE_NAMES
from recsvc.service.recommend import OTHER
from recsvc.web import api

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]


async def _recommend(client: Client, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/recommendations", json=body)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    msgspec.convert(answer, api.RecommendResponse)  # the contract holds
    return answer


async def test_contributions_add_up_to_each_score(client: Client) -> None:
    answer = await _recommend(client, user_id="u1", n=10, explain=True)
    assert answer["strategy"] == "model" and len(answer["items"]) == 10
    for item in answer["items"]:
        explanation = item["explanation"]
        contributions = explanation["contributions"]
        assert len(contributions) == 6 and contributions[-1]["feature"] == OTHER
        total = explanation["base_value"] + sum(c["contribution"] for c in contributions)
        assert total == pytest.approx(item["score"], abs=1e-6)
        shown = [abs(c["contribution"]) for c in contributions[:-1]]
        assert shown == sorted(shown, reverse=True)  # the largest, in order
        assert {c["feature"] for c in contributions[:-1]} <= set(FEATURE_NAMES)
    # Different items are explained differently (not one explanation copied).
    firsts = {
        tuple(c["feature"] for c in i["explanation"]["contributions"]) for i in answer["items"]
    }
    assert len(firsts) > 1


async def test_every_feature_when_asked_for_all(client: Client) -> None:
    answer = await _recommend(
        client, user_id="u2", n=3, explain=True, explain_top=len(FEATURE_NAMES) + 5
    )
    for item in answer["items"]:
        contributions = item["explanation"]["contributions"]
        assert len(contributions) == len(FEATURE_NAMES) + 1
        assert contributions[-1]["contribution"] == pytest.approx(0.0, abs=1e-12)
        total = item["explanation"]["base_value"] + sum(c["contribution"] for c in contributions)
        assert total == pytest.approx(item["score"], abs=1e-6)


async def test_no_explanation_unless_asked_or_without_a_model(client: Client) -> None:
    plain = await _recommend(client, user_id="u1", n=3)
    assert all("explanation" not in i for i in plain["items"])
    fallback = await _recommend(client, user_id="nobody", n=3, explain=True)
    assert fallback["strategy"] == "fallback"
    assert all("explanation" not in i for i in fallback["items"])
    bad = await client.post(
        "/v1/recommendations", json={"user_id": "u1", "explain": True, "explain_top": 0}
    )
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "explain_top"


async def test_get_form_explains_too(client: Client) -> None:
    resp = await client.get(
        "/v1/recommendations", params={"user_id": "u1", "n": "2", "explain": "true"}
    )
    body = await resp.json()
    assert resp.status == 200 and all("explanation" in i for i in body["items"])
