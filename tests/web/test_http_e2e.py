"""The HTTP API end to end: real server on 127.0.0.1, real Redis, real model."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.candidates import GENERATED
from features.synthetic import SyntheticData
from recsvc.web.app import create_app
from tests.conftest import TEST_KEY, settings_for
from tests.helpers import private_seeded_redis

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]


async def _post(client: Client, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/recommendations", json=body)
    return resp.status, await resp.json()


async def test_known_user_gets_n_distinct_model_items(client: Client) -> None:
    status, body = await _post(client, {"user_id": "u1", "n": 10})
    assert status == 200
    assert body["strategy"] == "model" and body["fallback_reason"] is None
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 10 and len(set(ids)) == 10
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert [i["rank"] for i in body["items"]] == list(range(1, 11))
    assert {i["source"] for i in body["items"]} <= set(GENERATED)
    assert body["model"]["name"] == "ranker" and body["model"]["version"]
    assert body["request_id"] and body["user_id"] == "u1"


async def test_unknown_user_gets_popular_fallback(client: Client) -> None:
    status, body = await _post(client, {"user_id": "nobody-123"})
    assert status == 200
    assert body["strategy"] == "fallback" and body["fallback_reason"] == "unknown_user"
    assert len({i["item_id"] for i in body["items"]}) == 10
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


async def test_fallback_honours_context_category(client: Client, small_data: SyntheticData) -> None:
    status, body = await _post(
        client, {"user_id": "new-user", "n": 5, "context": {"category": "c3"}}
    )
    assert status == 200
    cat = dict(zip(small_data.catalogue.item_ids, small_data.catalogue.categories, strict=True))
    assert all(cat[i["item_id"]] == "c3" for i in body["items"])
    assert {i["source"] for i in body["items"]} == {"category_popular"}


async def test_explicit_candidates_are_the_only_ones_ranked(client: Client) -> None:
    wanted = ["i1", "i2", "i3", "i4", "i5", "i6", "not-an-item"]
    status, body = await _post(client, {"user_id": "u1", "n": 3, "candidates": wanted})
    assert status == 200 and body["strategy"] == "model"
    assert len(body["items"]) == 3
    assert {i["item_id"] for i in body["items"]} <= set(wanted)
    assert {i["source"] for i in body["items"]} == {"request"}


async def test_excluded_items_never_come_back(client: Client) -> None:
    _, first = await _post(client, {"user_id": "u1", "n": 20})
    top = [i["item_id"] for i in first["items"]][:5]
    _, second = await _post(client, {"user_id": "u1", "n": 20, "exclude": top})
    assert len(second["items"]) == 20
    assert not {i["item_id"] for i in second["items"]} & set(top)


async def test_purchased_items_never_come_back(client: Client, seeded: Redis) -> None:
    buyer, bought = "", set()
    for u in range(400):
        bought = {m.decode() for m in await seeded.zrange(f"{{u:u{u}}}:p", 0, -1)}
        if len(bought) >= 2:
            buyer = f"u{u}"
            break
    assert buyer, "the small log has buyers"
    # Even when asked to rank exactly their purchases plus one more item...
    other = next(f"i{k}" for k in range(300) if f"i{k}" not in bought)
    _, body = await _post(
        client, {"user_id": buyer, "n": 10, "candidates": [*sorted(bought), other]}
    )
    assert [i["item_id"] for i in body["items"]] == [other]
    # ...and in the generated list.
    _, body = await _post(client, {"user_id": buyer, "n": 100})
    assert not {i["item_id"] for i in body["items"]} & bought


async def test_default_strategy_fills_n_despite_exclusions(
    client: Client, small_data: SyntheticData
) -> None:
    cat = dict(zip(small_data.catalogue.item_ids, small_data.catalogue.categories, strict=True))
    in_c3 = [i for i, c in cat.items() if c == "c3"]
    _, body = await _post(
        client,
        {
            "user_id": "new-user",
            "n": len(in_c3),
            "exclude": in_c3[:2],
            "context": {"category": "c3"},
        },
    )
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == len(in_c3) and len(set(ids)) == len(ids)
    assert not set(ids) & set(in_c3[:2])
    sources = [i["source"] for i in body["items"]]
    assert sources == ["category_popular"] * (len(in_c3) - 2) + ["popular"] * 2


async def test_get_form_matches_post(client: Client) -> None:
    resp = await client.get("/v1/recommendations", params={"user_id": "u2", "n": "4"})
    body = await resp.json()
    assert resp.status == 200 and len(body["items"]) == 4 and body["strategy"] == "model"
    assert "redis;dur=" in resp.headers["Server-Timing"]
    _, posted = await _post(client, {"user_id": "u2", "n": 4})
    assert [i["item_id"] for i in posted["items"]] == [i["item_id"] for i in body["items"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u1", "n": 0}, "n"),
        ({"user_id": "u1", "n": 10000}, "n"),
        ({"user_id": "u" * 1000}, "user_id"),
        ({"user_id": "u1", "candidates": "i1"}, "candidates"),
        ({"user_id": "u1", "candidates": [1, 2]}, "candidates[0]"),
        ({"user_id": "u1", "candidates": ["i1"] * 1001}, "candidates"),
        ({"user_id": "has space"}, "user_id"),
        ({"n": 3}, "user_id"),
        ({"user_id": "u1", "nn": 3}, "nn"),
        ({"user_id": "u1", "context": {"category": 5}}, "context.category"),
        ({"user_id": "u1", "candidates": []}, "candidates"),
        ({"user_id": "u1", "context": {"categori": "c1"}}, "context.categori"),
        ([1, 2], "body"),
    ],
)
async def test_bad_input_is_400_naming_the_field(client: Client, body: Any, field: str) -> None:
    status, answer = await _post(client, body)
    assert status == 400
    assert answer["error"]["field"] == field
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"user_id": ', b'{"user_id": "\xff\xfe"}'])
async def test_undecodable_body_is_400_without_decoder_text(client: Client, raw: bytes) -> None:
    resp = await client.post(
        "/v1/recommendations", data=raw, headers={"content-type": "application/json"}
    )
    body = await resp.json()
    assert resp.status == 400
    assert body["error"] == {
        "code": "invalid_json",
        "field": "body",
        "message": "request body is not valid UTF-8 JSON",
    }


async def test_bad_query_string_is_400(client: Client) -> None:
    resp = await client.get("/v1/recommendations", params={"user_id": "u1", "n": "many"})
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "n"


async def test_unknown_route_and_method_answer_json(client: Client) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.delete("/v1/recommendations")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]


async def test_oversized_body_is_413(client: Client) -> None:
    body = io.BytesIO(b"{" + b" " * (2 << 20) + b"}")
    resp = await client.post(
        "/v1/recommendations", data=body, headers={"content-type": "application/json"}
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_64_kib_is_the_body_limit_and_a_larger_one_never_reaches_the_handler(
    client: Client,
) -> None:
    limit = 64 * 1024
    body = b'{"user_id": "u1"' + b" " * (limit - 17) + b"}"
    assert len(body) == limit
    ok = await client.post(
        "/v1/recommendations", data=body, headers={"content-type": "application/json"}
    )
    assert ok.status == 200
    over = await client.post(
        "/v1/recommendations", data=body + b" ", headers={"content-type": "application/json"}
    )
    assert over.status == 413
    # Announce 10 MB and send one byte: the answer comes without the body being read.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
        b"Content-Length: 10000000\r\n\r\n{"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 2.0)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    assert 0 <= body["item_data_age_secs"] < 5
    assert body["checks"] == {
        "redis": True,
        "model": True,
        "default_strategy": True,
    }


async def test_missing_model_serves_default_with_reason(
    seeded: Redis, redis_url: str, tmp_path: Path
) -> None:
    app = create_app(settings_for(tmp_path / "empty"), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        status, body = await _post(c, {"user_id": "u1"})
        assert status == 200
        assert body["strategy"] == "fallback"
        assert body["fallback_reason"] == "model_unavailable"
        assert len(body["items"]) == 10
        assert (await c.get("/readyz")).status == 200


async def test_dead_redis_serves_default_from_memory(
    small_data: SyntheticData, model_dir: Path
) -> None:
    server = await private_seeded_redis(small_data)
    try:
        app = create_app(settings_for(model_dir), server.url)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            assert (await _post(c, {"user_id": "u1"}))[1]["strategy"] == "model"
            server.stop()
            for _ in range(10):  # through failures, then with the circuit open
                status, body = await _post(c, {"user_id": "u1"})
                assert status == 200
                assert body["strategy"] == "fallback"
                assert body["fallback_reason"] == "feature_store_unavailable"
                assert len(body["items"]) == 10
            # Still serving from memory: degraded, not out of rotation.
            ready = await c.get("/readyz")
            body = await ready.json()
            assert ready.status == 200 and body["status"] == "degraded"
            assert body["checks"]["redis"] is False
            assert body["circuit"] == "open"  # ten failures, five needed
    finally:
        server.stop()


async def test_get_form_takes_comma_separated_lists(client: Client) -> None:
    resp = await client.get(
        "/v1/recommendations", params={"user_id": "u3", "n": "5", "exclude": "i1,i2"}
    )
    body = await resp.json()
    assert resp.status == 200 and len(body["items"]) == 5
    assert not {"i1", "i2"} & {i["item_id"] for i in body["items"]}


async def test_over_the_inflight_limit_is_503(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    settings = settings_for(model_dir, max_inflight=1, redis_timeout_ms=3000.0)
    app = create_app(settings, redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        # Stall Redis so the first request stays in flight.
        await seeded.execute_command("CLIENT", "PAUSE", "600", "ALL")
        slow = asyncio.create_task(c.post("/v1/recommendations", json={"user_id": "u1"}))
        await asyncio.sleep(0.2)
        resp = await c.post("/v1/recommendations", json={"user_id": "u2"})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "overloaded"
        first = await slow
        assert first.status == 200
        assert (await first.json())["strategy"] == "model"


async def test_cors_allows_listed_origins_only(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    shop = "https://shop.example.com"
    settings = settings_for(model_dir, cors_origins=f"{shop}, http://localhost:3000")
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        preflight = {"Origin": shop, "Access-Control-Request-Method": "POST"}
        ok = await c.options("/v1/recommendations", headers=preflight)
        assert ok.status == 204
        assert ok.headers["Access-Control-Allow-Origin"] == shop
        assert "X-Request-Id" in ok.headers["Access-Control-Allow-Headers"]
        assert "Access-Control-Allow-Credentials" not in ok.headers
        other = {**preflight, "Origin": "https://evil.example"}
        refused = await c.options("/v1/recommendations", headers=other)
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "origin_not_allowed"
        answer = await c.post(
            "/v1/recommendations", json={"user_id": "u1"}, headers={"Origin": shop}
        )
        assert answer.status == 200 and answer.headers["Access-Control-Allow-Origin"] == shop
        assert "Server-Timing" in answer.headers["Access-Control-Expose-Headers"]
        assert "Origin" in answer.headers.getall("Vary")
        error = await c.post("/v1/recommendations", json={"n": 1}, headers={"Origin": shop})
        assert error.status == 400 and error.headers["Access-Control-Allow-Origin"] == shop
        foreign = await c.post(
            "/v1/recommendations",
            json={"user_id": "u1"},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status == 200 and "Access-Control-Allow-Origin" not in foreign.headers


async def test_no_cors_headers_without_origins_configured(client: Client) -> None:
    resp = await client.post(
        "/v1/recommendations", json={"user_id": "u1"}, headers={"Origin": "https://shop.example"}
    )
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_whole_number_floats_are_integers_and_unknown_items_are_listed(
    client: Client,
) -> None:
    """Found by schemathesis: JSON Schema counts 5.0 as an integer, and a feature
    read naming only unknown items was a 500."""
    status, body = await _post(client, {"user_id": "u1", "n": 5.0, "explain_top": 2.0})
    assert status == 200 and len(body["items"]) == 5
    status, body = await _post(client, {"user_id": "u1", "n": 5.5})
    assert status == 400 and body["error"]["field"] == "n"
    resp = await client.post("/v1/features", json={"user_ids": ["u1"], "item_ids": ["nope"]})
    assert resp.status == 200 and (await resp.json())["unknown_items"] == ["nope"]
