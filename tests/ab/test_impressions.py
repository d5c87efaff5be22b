"""The impression log: every answered recommendation (any strategy, any user) in the
``{ab}:impressions`` stream, sampled, never waited for, drops counted; against a
real server and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from recsvc.ab import impressions
from recsvc.ab.experiments import parse
from recsvc.ab.impressions import ImpressionLog
from recsvc.service.recommend import Result
from recsvc.service.timing import StageTimer
from recsvc.store import keys
from recsvc.web import appkeys
from recsvc.web.app import create_app
from tests.conftest import settings_for
from tests.ops.test_metrics import delta, scrape

SHELF = """
[[experiment]]
name = "shelf"
salt = "imp-1"
traffic = 0.5
allow_override = true
  [[experiment.variant]]
  name = "control"
  weight = 90
  strategy = "popular"
  [[experiment.variant]]
  name = "treatment"
  weight = 10
  model = "ranker"
"""
SHELF_WEIGHTS = {"traffic": 0.5, "variants": {"control": 90.0, "treatment": 10.0}}
FIELDS = {
    "request_id",
    "user_id",
    "ts",
    "strategy",
    "fallback_reason",
    "model",
    "version",
    "arm",
    "rollout",
    "canary_share",
    "experiments",
    "weights",
    "forced",
    "items",
    "sources",
    "latency_ms",
    "sample",
}
Client = TestClient[Any, Any]


def users_by_variant() -> dict[str, str]:
    """A known user in each variant of SHELF, and one outside its traffic."""
    shelf = parse(SHELF, "shelf", {"ranker"})
    found: dict[str, str] = {}
    for k in range(1, 399):
        found.setdefault(shelf.assign(f"u{k}").variants.get("shelf", "out"), f"u{k}")
    assert set(found) == {"control", "treatment", "out"}
    return found


@asynccontextmanager
async def serving(
    redis_url: str, model_dir: Path, **settings: Any
) -> AsyncIterator[tuple[Client, ImpressionLog]]:
    """A real server; on leaving, its writer has flushed what was queued."""
    app = create_app(settings_for(model_dir, **settings), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, app[appkeys.IMPRESSIONS]


async def logged(redis: Redis) -> list[dict[str, Any]]:
    entries = await redis.xrange(keys.IMPRESSIONS)
    assert all(set(fields) == {b"json"} for _, fields in entries)  # one field per entry
    return [orjson.loads(fields[b"json"]) for _, fields in entries]


@pytest.mark.asyncio
async def test_every_answer_is_logged_whatever_its_strategy(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(SHELF)
    users = users_by_variant()
    started = time.time()
    async with serving(redis_url, model_dir, experiments=path) as (c, _):
        answers = []
        for body in (
            {"user_id": users["out"]},  # the default model, no experiment
            {"user_id": "nobody-knows-me"},  # fallback: unknown_user
            {"user_id": users["control"]},  # popular, chosen by the experiment
            {"user_id": users["treatment"], "n": 3},  # the model, inside the experiment
            {"user_id": users["out"], "flags": {"shelf": "control"}},  # forced
        ):
            resp = await c.post("/v1/recommendations", json=body)
            assert resp.status == 200
            answers.append(await resp.json())
        resp = await c.get("/v1/recommendations", params={"user_id": users["out"], "n": "2"})
        answers.append(await resp.json())
    rows = await logged(seeded)
    assert [r["request_id"] for r in rows] == [a["request_id"] for a in answers]
    for row, answer in zip(rows, answers, strict=True):
        assert set(row) == FIELDS
        assert row["user_id"] == answer["user_id"]
        assert (row["strategy"], row["fallback_reason"]) == (
            answer["strategy"],
            answer["fallback_reason"],
        )
        model = answer["model"] or {"name": None, "version": None}
        assert (row["model"], row["version"]) == (model["name"], model["version"])
        assert row["items"] == [i["item_id"] for i in answer["items"]]
        assert row["sources"] == [i["source"] for i in answer["items"]]
        assert row["experiments"] == answer["experiments"]
        assert row["forced"] == answer.get("forced", [])
        assert row["weights"] == dict.fromkeys(answer["experiments"], SHELF_WEIGHTS)
        assert (row["arm"], row["rollout"], row["canary_share"]) == (None, None, None)
        assert row["sample"] == 1.0
        assert started <= row["ts"] <= time.time()
        assert 0.0 < row["latency_ms"] < 10_000.0
    out, unknown, control, treatment, forced, by_get = rows
    assert out["strategy"] == "model" and out["experiments"] == {} and out["weights"] == {}
    assert (unknown["strategy"], unknown["fallback_reason"]) == ("fallback", "unknown_user")
    assert unknown["model"] is None and unknown["items"]
    assert control["strategy"] == "popular" and control["experiments"] == {"shelf": "control"}
    assert treatment["strategy"] == "model" and len(treatment["items"]) == 3
    assert forced["forced"] == ["shelf"] and forced["strategy"] == "popular"
    assert by_get["strategy"] == "model" and len(by_get["items"]) == 2


def test_a_canary_decision_on_the_result_goes_into_the_impression() -> None:
    result = Result("r", "u", [], "model", None, {"name": "m", "version": "v"}, StageTimer())
    assert (result.arm, result.rollout, result.canary_share) == (None, None, None)
    result.arm, result.rollout, result.canary_share = "canary", "ranker-2026-12", 0.05
    row = impressions.entry(
        request_id=result.request_id,
        user_id=result.user_id,
        ts=1.0,
        strategy=result.strategy,
        fallback_reason=None,
        model=result.model,
        arm=result.arm,
        rollout=result.rollout,
        canary_share=result.canary_share,
        experiments={},
        weights={},
        forced=frozenset(),
        items=[],
        sources=[],
        latency_ms=1.0,
        sample=1.0,
    )
    assert (row["arm"], row["rollout"], row["canary_share"]) == ("canary", "ranker-2026-12", 0.05)
    assert (row["model"], row["version"]) == ("m", "v")


@pytest.mark.asyncio
@pytest.mark.parametrize(("sample", "low", "high"), [(0.0, 0, 0), (1.0, 300, 300), (0.5, 110, 190)])
async def test_sampling_logs_that_share_of_the_answers(
    seeded: Redis, redis_url: str, model_dir: Path, sample: float, low: int, high: int
) -> None:
    """0 logs nothing, 1 every answer, 0.5 about half (300 draws: 150 ± 40 is
    beyond 4.6 standard deviations)."""
    async with serving(redis_url, model_dir, impressions_sample=sample) as (c, log):
        for k in range(300):
            resp = await c.post("/v1/recommendations", json={"user_id": f"u{k % 50 + 1}", "n": 2})
            assert resp.status == 200
    assert low <= await seeded.xlen(keys.IMPRESSIONS) <= high
    assert log.dropped == 0
    assert all(r["sample"] == sample for r in await logged(seeded))


@pytest.mark.asyncio
async def test_impressions_are_dropped_and_counted_when_redis_is_down(model_dir: Path) -> None:
    app_settings = {"impressions_sample": 1.0}
    dead = "unix:///nonexistent/recsvc.sock"
    async with serving(dead, model_dir, **app_settings) as (c, log):
        # /metrics on the dead service's own registry: counters are process-wide.
        before = await scrape(c)
        for k in range(20):
            resp = await c.post("/v1/recommendations", json={"user_id": f"u{k}"})
            body = await resp.json()
            assert body["fallback_reason"] == "feature_store_unavailable"
        for _ in range(100):  # the writer fails in the background within ~2 s
            if log.dropped >= 20:
                break
            await asyncio.sleep(0.05)
        after = await scrape(c)
    assert log.dropped == 20 and log.written == 0
    assert delta(before, after, "recsvc_exposures_dropped_total") == 20
    labels = {"stream": "impressions", "result": "redis_error"}
    assert delta(before, after, "recsvc_impression_log_total", **labels) == 20


@pytest.mark.asyncio
async def test_a_full_queue_drops_and_counts_instead_of_waiting(aredis: Redis) -> None:
    labels = {"stream": "impressions", "result": "queue_full"}
    before = REGISTRY.get_sample_value("recsvc_impression_log_total", labels) or 0.0
    log = ImpressionLog(aredis, 100_000)
    for k in range(impressions.QUEUE_MAX + 5):
        log.impression({"request_id": f"r{k}"})  # returns at once: nothing awaits
    assert log.dropped == 5 and log.queue.qsize() == impressions.QUEUE_MAX
    assert REGISTRY.get_sample_value("recsvc_impression_log_total", labels) == before + 5
    stop = asyncio.Event()
    stop.set()
    await log.run(stop)  # the flush on stopping writes what was queued
    assert log.written == impressions.QUEUE_MAX
    assert await aredis.xlen(keys.IMPRESSIONS) == impressions.QUEUE_MAX
