"""Access by API key and scope, end to end: real server on 127.0.0.1, real Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from recsvc.ops.logs import JsonFormatter
from recsvc.web import appkeys, openapi
from recsvc.web.app import create_app
from recsvc.web.server import setup_runner
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]

KEYS = {
    # name: (scopes, key)
    "shop-web": ("recommend+events", "shop-web-key-0000000000000001"),
    "shop-web-next": ("recommend+events", "shop-web-key-0000000000000002"),  # rotation
    "analytics": ("features", "analytics-key-00000000000000003"),
    "ops": ("admin", "ops-key-000000000000000000000004"),
}
SETTING = ",".join(f"{name}:{scopes}:{key}" for name, (scopes, key) in KEYS.items())
WRONG = "not-a-configured-key-0000000000"

# (method, path, body, scope): every protected route.
ROUTES = [
    ("POST", "/v1/recommendations", {"user_id": "u1"}, "recommend"),
    ("GET", "/v1/recommendations?user_id=u1", None, "recommend"),
    ("GET", "/v1/experiments/u1", None, "recommend"),
    (
        "POST",
        "/v1/events",
        {"event_id": "a-1", "user_id": "u1", "item_id": "i1", "type": "view"},
        "events",
    ),
    ("GET", "/v1/users/u1/features", None, "features"),
    ("POST", "/v1/features", {"user_ids": ["u1"]}, "features"),
    ("GET", "/metrics", None, "admin"),
    ("GET", "/admin/models", None, "admin"),
    ("POST", "/admin/models/reload", None, "admin"),
    ("PUT", "/admin/items", {"items": [{"item_id": "i1", "category": "c1"}]}, "admin"),
    ("DELETE", "/admin/items/no-such-item", None, "admin"),
    ("POST", "/admin/items/delete", {"item_ids": ["no-such-item"]}, "admin"),
]
KEY_OF_SCOPE = {"recommend": "shop-web", "events": "shop-web", "features": "analytics"}
KEY_OF_SCOPE["admin"] = "ops"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][1]}"}


@pytest_asyncio.fixture
async def keyed(seeded: Redis, redis_url: str, model_dir: Path) -> AsyncIterator[Client]:
    """A server with the KEYS configured; its client sends no key of its own."""
    settings = settings_for(model_dir, api_keys=SETTING, request_log_sample=1.0)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        yield c


async def _call(c: Client, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return await c.request(method, path, json=body, headers=headers)


async def test_a_users_recent_items_are_not_open_to_anyone(keyed: Client) -> None:
    """The review's finding: GET /v1/users/{id}/features returned a user's recent
    items with their times to anyone. Now it needs a key with the features scope."""
    anonymous = await keyed.get("/v1/users/u1/features")
    text = await anonymous.text()
    assert anonymous.status == 401 and "recent" not in text
    shop = await keyed.get("/v1/users/u1/features", headers=auth("shop-web"))
    assert shop.status == 403 and "recent" not in await shop.text()
    allowed = await keyed.get("/v1/users/u1/features", headers=auth("analytics"))
    body = await allowed.json()
    assert allowed.status == 200 and body["known"] and body["recent"]
    many = await keyed.post("/v1/features", json={"user_ids": ["u1"]})
    assert many.status == 401


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES)
async def test_each_route_needs_a_key_with_its_scope(
    keyed: Client, method: str, path: str, body: Any, scope: str
) -> None:
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": WRONG}):
        resp = await _call(keyed, method, path, body, headers)
        answer = await resp.json()
        assert resp.status == 401, (headers, answer)
        assert answer["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="recsvc"'
        assert WRONG not in await resp.text()
    for name in ("shop-web", "analytics", "ops"):
        resp = await _call(keyed, method, path, body, auth(name))
        if name == KEY_OF_SCOPE[scope]:
            assert resp.status not in (401, 403), await resp.text()
            continue
        answer = await resp.json()
        assert resp.status == 403, answer
        assert answer["error"]["code"] == "insufficient_scope"
        assert scope in answer["error"]["message"]
        assert f'scope="{scope}"' in resp.headers["WWW-Authenticate"]


async def test_the_contract_and_the_route_table_name_the_same_scopes(keyed: Client) -> None:
    access = keyed.app[appkeys.ACCESS]
    served = {r.canonical: scope for r, scope in access.scopes.items()}
    documented = {
        path: operation["security"][0]["apiKey"][0]
        for path, operations in openapi.document()["paths"].items()
        for operation in operations.values()
        if operation["security"]
    }
    admin = {p: s for p, s in served.items() if p.startswith("/admin/")}  # not in the contract
    assert served == documented | admin and set(admin.values()) == {"admin"}


async def test_open_routes_and_preflights_need_no_key(keyed: Client) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/"):
        assert (await keyed.get(path)).status == 200, path
    # Unknown routes stay 404 (the route table is public in /openapi.json anyway).
    assert (await keyed.get("/nowhere")).status == 404


async def test_two_keys_of_one_scope_both_work_and_are_counted_by_name(
    keyed: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="recsvc.access"):
        for name in ("shop-web", "shop-web-next"):
            resp = await keyed.post(
                "/v1/recommendations",
                json={"user_id": "u1"},
                headers={**auth(name), "X-Request-Id": f"rot-{name}"},
            )
            assert resp.status == 200 and (await resp.json())["strategy"] == "model"
        await keyed.get("/v1/users/u1/features", headers={**auth("shop-web"), "X-Request-Id": "no"})
    lines = {r.request_id: r for r in caplog.records if r.name == "recsvc.access"}  # type: ignore[attr-defined]
    assert lines["rot-shop-web"].key == "shop-web"  # type: ignore[attr-defined]
    assert lines["rot-shop-web-next"].key == "shop-web-next"  # type: ignore[attr-defined]
    assert lines["no"].key == "shop-web" and lines["no"].status == 403  # type: ignore[attr-defined]
    written = "\n".join(JsonFormatter().format(r) for r in lines.values())
    assert '"key":"shop-web"' in written.replace(" ", "")
    metrics = await (await keyed.get("/metrics", headers=auth("ops"))).text()
    assert not [key for _, key in KEYS.values() if key in metrics]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    for name in ("shop-web", "shop-web-next"):
        labels = (("key", name), ("scope", "recommend"))
        assert samples[("recsvc_api_requests_total", labels)] >= 1
    assert samples[("recsvc_auth_denied_total", (("reason", "scope"),))] >= 1


async def test_cors_preflight_needs_no_key_and_only_browser_routes_answer_browsers(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    shop = "https://shop.example.com"
    settings = settings_for(model_dir, api_keys=SETTING, cors_origins=shop)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        preflight = {"Origin": shop, "Access-Control-Request-Method": "POST"}
        ok = await c.options("/v1/recommendations", headers=preflight)
        assert ok.status == 204 and ok.headers["Access-Control-Allow-Origin"] == shop
        assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]
        assert (await c.options("/v1/events", headers=preflight)).status == 204
        # A browser can read the 401 (and so tell a missing key from a network error).
        refused = await c.post(
            "/v1/recommendations", json={"user_id": "u1"}, headers={"Origin": shop}
        )
        assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == shop
        for path in ("/v1/features", "/v1/users/u1/features", "/metrics", "/admin/models"):
            answer = await c.options(
                path, headers={**preflight, "Access-Control-Request-Method": "GET"}
            )
            assert "Access-Control-Allow-Origin" not in answer.headers, path
        read = await c.get("/v1/users/u1/features", headers={"Origin": shop, **auth("analytics")})
        assert read.status == 200 and "Access-Control-Allow-Origin" not in read.headers


async def test_the_admin_token_is_one_key_with_the_admin_scope(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    token = "the-old-admin-token-0000000"
    legacy = {"Authorization": f"Bearer {token}"}
    # Alone it guards /admin, as before; the API routes stay open.
    alone = create_app(settings_for(model_dir, admin_token=token), redis_url)
    async with TestClient(TestServer(alone, host="127.0.0.1")) as c:
        assert (await c.post("/v1/recommendations", json={"user_id": "u1"})).status == 200
        assert (await c.get("/admin/models")).status == 401
        assert (await c.get("/admin/models", headers=legacy)).status == 200
    # With API keys it is one of them, with the admin scope only.
    both = create_app(settings_for(model_dir, admin_token=token, api_keys=SETTING), redis_url)
    async with TestClient(TestServer(both, host="127.0.0.1")) as c:
        assert (await c.get("/admin/models", headers=legacy)).status == 200
        assert (await c.get("/admin/models", headers=auth("ops"))).status == 200
        resp = await c.post("/v1/recommendations", json={"user_id": "u1"}, headers=legacy)
        assert resp.status == 403


async def test_requests_without_a_key_take_no_place_and_get_no_default_answer(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    """As `recsvc serve` runs it (the front door admits recommendations before
    routing), with one place in flight and overload answered by the default
    strategy: while an admitted request holds the place, callers without a key
    get 401 or 403 (not the default strategy, not 503) and never hold the place."""
    settings = settings_for(
        model_dir,
        api_keys=SETTING,
        max_inflight=1,
        overload_response="default",
        redis_timeout_ms=3000.0,
    )
    app = create_app(settings, redis_url)
    runner = await setup_runner(app)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    admission = app[appkeys.ADMISSION]
    try:
        async with TestClient(TestServer(web.Application())) as http:
            url = f"http://127.0.0.1:{port}/v1/recommendations"
            await seeded.execute_command("CLIENT", "PAUSE", "600", "ALL")
            slow = asyncio.create_task(
                http.session.post(url, json={"user_id": "u1"}, headers=auth("shop-web"))
            )
            await asyncio.sleep(0.2)
            assert admission.inflight == 1
            for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, auth("analytics")):
                resp = await http.session.post(url, json={"user_id": "u2"}, headers=headers)
                answer = await resp.json()
                assert resp.status in (401, 403) and "items" not in answer, answer
                assert admission.inflight == 1
            over = await http.session.post(url, json={"user_id": "u2"}, headers=auth("shop-web"))
            assert over.status == 503  # with a key: turned away for load, as before
            first = await slow
            assert first.status == 200 and (await first.json())["strategy"] == "model"
        assert admission.inflight == 0
    finally:
        await runner.cleanup()


async def test_metrics_can_move_to_their_own_listener(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    """With RECSVC_METRICS_PORT the main listener has no /metrics (the workers
    test, tests/web/test_workers_e2e.py, scrapes the other port)."""
    settings = settings_for(model_dir, api_keys=SETTING, metrics_port=1)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        assert (await c.get("/metrics", headers=auth("ops"))).status == 404


async def test_a_malformed_header_never_puts_a_key_in_the_log_or_the_answer(
    seeded: Redis, redis_url: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From the outside review: a request aiohttp cannot parse (a key file saved
    with a trailing CR, a NUL, a header past 8 KB) was answered with the
    parser's message and logged with a traceback, both quoting the header line
    with the key. Now: a JSON 400, one debug line naming the error class."""
    key = KEYS["shop-web"][1]
    runner = await setup_runner(create_app(settings_for(model_dir, api_keys=SETTING), redis_url))
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    answers = []
    try:
        with caplog.at_level(logging.DEBUG):
            for bad in (b"\r", b"\x00", b"x" * 9000):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"GET /v1/experiments/u1 HTTP/1.1\r\nHost: t\r\n"
                    b"Authorization: Bearer " + key.encode() + bad + b"\r\n\r\n"
                )
                await writer.drain()
                answers.append(await asyncio.wait_for(reader.read(), 5.0))
                writer.close()
    finally:
        await runner.cleanup()
    for answer in answers:
        assert answer.split(b" ", 2)[1] == b"400", answer[:200]
        assert b'"code":"bad_request"' in answer and key.encode() not in answer
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.exc_info or ''}" for r in caplog.records
    )
    assert key not in logged and "malformed HTTP request" in logged
    assert not any(r.exc_info for r in caplog.records)
