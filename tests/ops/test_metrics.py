"""/metrics, request ids and the request log line, against a real server and Redis.

Metrics are process-wide (prometheus-client's registry), so every check is a
difference between two scrapes around the requests under test.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from features.synthetic import SyntheticData
from recsvc.ops import metrics
from recsvc.web.app import create_app
from recsvc.web.server import setup_runner
from tests.conftest import settings_for
from tests.helpers import private_seeded_redis

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: Client) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, metric: str, **labels: str) -> float:
    return value(after, metric, **labels) - value(before, metric, **labels)


def series(samples: Samples, name: str) -> Iterable[tuple[dict[str, str], float]]:
    return ((dict(labels), v) for (n, labels), v in samples.items() if n == name)


@pytest.mark.asyncio
async def test_metrics_move_with_one_fallback_and_one_model_answer(client: Client) -> None:
    before = await scrape(client)
    fallback = await client.post("/v1/recommendations", json={"user_id": "nobody-metrics"})
    model = await client.post("/v1/recommendations", json={"user_id": "u1"})
    assert (await fallback.json())["fallback_reason"] == "unknown_user"
    answer = await model.json()
    assert answer["strategy"] == "model"
    bad = await client.post("/v1/recommendations", json={"n": 3})
    assert bad.status == 400
    event = {"event_id": "m-1", "user_id": "u1", "item_id": "i1", "type": "view"}
    await client.post("/v1/events", json=event)
    await client.post("/v1/events", json=event)  # the duplicate
    await client.post("/v1/events", json={"events": [{**event, "event_id": "m-2", "type": "x"}]})
    after = await scrape(client)

    http = "recsvc_http_request_duration_seconds_count"
    route = "/v1/recommendations"
    assert delta(before, after, http, route=route, method="POST", status="200") == 2
    assert delta(before, after, http, route=route, method="POST", status="400") == 1
    assert delta(before, after, http, route="/v1/events", method="POST", status="200") == 3
    assert delta(before, after, http, route="/metrics", method="GET", status="200") == 1
    rec = "recsvc_recommendation_duration_seconds_count"
    assert delta(before, after, rec, strategy="model") == 1
    assert delta(before, after, rec, strategy="fallback") == 1
    assert delta(before, after, "recsvc_fallbacks_total", reason="unknown_user") == 1
    assert delta(before, after, "recsvc_fallbacks_total", reason="model_unavailable") == 0
    stage = "recsvc_stage_duration_seconds_count"
    assert delta(before, after, stage, stage="redis") == 2
    for name in ("candidates", "features", "score", "fallback"):
        assert delta(before, after, stage, stage=name) == 1, name
    assert delta(before, after, "recsvc_stage_duration_seconds_sum", stage="score") > 0
    events = "recsvc_events_total"
    assert delta(before, after, events, outcome="accepted") == 1
    assert delta(before, after, events, outcome="duplicate") == 1
    assert delta(before, after, events, outcome="rejected") == 1
    # State gauges: what this process serves now.
    loaded = {
        (labels["name"], labels["version"], labels["scorer"])
        for labels, v in series(after, "recsvc_model_loaded")
        if v == 1
    }
    assert (answer["model"]["name"], answer["model"]["version"], "native") in loaded
    assert 0 <= value(after, "recsvc_item_data_age_seconds") < 5
    assert value(after, "recsvc_variant_recommendation_duration_seconds_count") == 0
    assert value(after, "recsvc_redis_circuit_state") == 0
    assert value(after, "recsvc_inflight_requests") == 1  # the scrape itself
    causes = {labels["cause"] for labels, _ in series(after, "recsvc_shed_requests_total")}
    assert causes == {"admission", "max_inflight"}  # listed before the first rejection
    assert value(after, "recsvc_admission_limit") >= 1


@pytest.mark.asyncio
async def test_dead_redis_counts_errors_and_opens_the_circuit(
    small_data: SyntheticData, model_dir: Path
) -> None:
    server = await private_seeded_redis(small_data)
    try:
        app = create_app(settings_for(model_dir, breaker_failures=3), server.url)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            before = await scrape(c)
            server.stop()
            for _ in range(5):
                body = await (await c.post("/v1/recommendations", json={"user_id": "u1"})).json()
                assert body["fallback_reason"] == "feature_store_unavailable"
            after = await scrape(c)
    finally:
        server.stop()
    errors = sum(
        v - value(before, "recsvc_redis_errors_total", **labels)
        for labels, v in series(after, "recsvc_redis_errors_total")
        if labels["operation"] == "read"
    )
    assert errors == 3  # then the circuit opened: no more attempts, no more errors
    reason = "feature_store_unavailable"
    assert delta(before, after, "recsvc_fallbacks_total", reason=reason) == 5
    assert value(after, "recsvc_redis_circuit_state") == 2


@pytest.mark.asyncio
async def test_request_id_is_taken_from_the_request_or_made(client: Client) -> None:
    given = await client.post(
        "/v1/recommendations", json={"user_id": "u1"}, headers={"X-Request-Id": "fe-42.a:b"}
    )
    assert given.headers["X-Request-Id"] == "fe-42.a:b"
    # The answer's own id (experiment attribution) stays unique whatever the caller sends.
    answer_id = (await given.json())["request_id"]
    assert answer_id != "fe-42.a:b" and len(answer_id) == 16
    made = await client.post("/v1/recommendations", json={"user_id": "u1"})
    assert len(made.headers["X-Request-Id"]) == 16
    assert (await made.json())["request_id"] == made.headers["X-Request-Id"]
    # An id that could forge log lines or headers is replaced, not echoed.
    odd = await client.get("/healthz", headers={"X-Request-Id": 'a b"{}'})
    assert odd.headers["X-Request-Id"] != 'a b"{}' and len(odd.headers["X-Request-Id"]) == 16
    missing = await client.get("/nowhere", headers={"X-Request-Id": "r-404"})
    assert missing.status == 404 and missing.headers["X-Request-Id"] == "r-404"


@pytest.mark.asyncio
async def test_one_log_line_per_sampled_request(
    seeded: Redis, redis_url: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(model_dir, request_log_sample=1.0)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        with caplog.at_level(logging.INFO, logger="recsvc.access"):
            await c.post(
                "/v1/recommendations", json={"user_id": "nobody"}, headers={"X-Request-Id": "r1"}
            )
            await c.post(
                "/v1/recommendations", json={"user_id": "u1"}, headers={"X-Request-Id": "r2"}
            )
    lines = {r.request_id: r for r in caplog.records if r.name == "recsvc.access"}  # type: ignore[attr-defined]
    assert set(lines) == {"r1", "r2"}
    first, second = vars(lines["r1"]), vars(lines["r2"])
    assert first["route"] == "/v1/recommendations" and first["status"] == 200
    assert first["strategy"] == "fallback" and first["fallback_reason"] == "unknown_user"
    assert second["strategy"] == "model" and second["model_version"]
    assert second["latency_ms"] > 0 and second["experiments"] == {}


@pytest.mark.asyncio
async def test_unsampled_requests_are_not_logged(
    seeded: Redis, redis_url: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(model_dir, request_log_sample=0.0, request_log_slow_ms=1e9)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        with caplog.at_level(logging.INFO, logger="recsvc.access"):
            for _ in range(20):
                await c.post("/v1/recommendations", json={"user_id": "u1"})
    assert not [r for r in caplog.records if r.name == "recsvc.access"]


def test_a_model_version_that_comes_back_reads_1_again() -> None:
    serving = [{("m", "v1", "native")}]
    sampler = metrics.GaugeSampler(lambda: 1.0, lambda: "closed", lambda: serving[0])
    for now in ({("m", "v1", "native")}, {("m", "v2", "native")}, {("m", "v1", "native")}):
        serving[0] = now
        sampler.sample()
    loaded = parse(metrics.exposition().decode())
    assert value(loaded, "recsvc_model_loaded", name="m", version="v1", scorer="native") == 1
    assert value(loaded, "recsvc_model_loaded", name="m", version="v2", scorer="native") == 0


def test_multiprocess_directory_loses_only_metric_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "restored after the test")
    (tmp_path / "counter_123.db").write_bytes(b"old counts")
    (tmp_path / "notes.txt").write_text("not ours")
    metrics.prepare_multiprocess(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert os.environ[metrics.MULTIPROC_ENV] == str(tmp_path)


@pytest.mark.asyncio
async def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(
    redis_url: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From the review (issue 17, finding 8): closing a socket half way through
    a request body counted a 500 and logged a traceback per connection. The
    server is set up as `recsvc serve` sets it up (setup_runner: no handler
    cancellation), where the body read raises ConnectionResetError."""
    runner = await setup_runner(create_app(settings_for(model_dir), redis_url))
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def scrape_live() -> Samples:
                async with session.get("/metrics") as resp:
                    return parse(await resp.text())

            before = await scrape_live()
            with caplog.at_level(logging.INFO):
                for _ in range(5):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(
                        b"POST /v1/events HTTP/1.1\r\nHost: t\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                        b'{"events": ['
                    )
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.close()
                    await writer.wait_closed()
                await asyncio.sleep(0.3)
            after = await scrape_live()
    finally:
        await runner.cleanup()
    name = "recsvc_http_request_duration_seconds_count"
    labels = {"route": "/v1/events", "method": "POST"}
    assert delta(before, after, name, status="500", **labels) == 0
    assert delta(before, after, name, status="499", **labels) == 5
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
