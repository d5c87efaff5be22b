"""`recsvc simulate` against a real service that needs API keys, and what it keeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from features.events import EVENT_NAMES
from features.impressions import label, read_impressions
from features.logs import read_events
from features.synthetic import SyntheticConfig
from recsvc.cli.simulate import click_ndcg, served_table, simulate
from recsvc.ranking import models
from tests.conftest import TEST_KEY


@pytest.mark.asyncio
async def test_the_simulator_sends_its_key(client: TestClient[Any, Any]) -> None:
    host = str(client.make_url("")).rstrip("/")
    config = SyntheticConfig(n_users=400, n_items=300, n_events=1000, n_categories=12, seed=3)
    done = await simulate(host, 50, 10.0, 30, config, concurrency=2, key=TEST_KEY)
    assert done.requests == 30 and done.errors == 0
    refused = await simulate(host, 50, 10.0, 5, config, concurrency=1)  # no key: 401s
    assert refused.errors == refused.requests == 5


@pytest.mark.asyncio
async def test_the_simulator_keeps_what_it_was_shown_and_scores_it_per_version(
    client: TestClient[Any, Any], aredis: Redis, model_dir: Path, tmp_path: Path
) -> None:
    host = str(client.make_url("")).rstrip("/")
    config = SyntheticConfig(n_users=400, n_items=300, n_events=1000, n_categories=12, seed=3)
    log = tmp_path / "events.csv"
    log.write_text("ts,user_id,item_id,type\n1700000000.000,u1,i1,view\n")  # the demo's log
    out = tmp_path / "impressions"
    done = await simulate(
        host, 60, 20.0, 60, config, concurrency=2, key=TEST_KEY, events_log=log, impressions_out=out
    )
    assert done.requests == 60 and done.errors == 0 and done.clicks > 0
    assert not list(out.glob("*.open"))  # complete files only
    logged = read_impressions(out)
    assert len(logged.impressions) == 60
    [version] = models.versions(model_dir, "ranker")
    for imp in logged.impressions:
        assert (imp.strategy, imp.model, imp.version) == ("model", "ranker", version.name)
        assert len(imp.items) == 10
    # Every applied event is appended to the log, as the outcome of its answer,
    # with the time the service recorded (its outcome stream says which).
    events = read_events(log)
    assert len(events) == 1 + done.clicks + done.purchases == 1 + len(logged.outcomes)
    appended = sorted((float(ts), u, i, EVENT_NAMES[t]) for ts, u, i, t in list(events.rows())[1:])
    outcomes = sorted((o.ts, o.user_id, o.item_id, EVENT_NAMES[o.type]) for o in logged.outcomes)
    assert appended == outcomes
    recorded: list[tuple[float, str, str, str]] = []
    for _ in range(50):
        entries = await aredis.xrange("{ab}:outcomes")
        if len(entries) == len(outcomes):
            break
        await asyncio.sleep(0.1)
    recorded = sorted(
        (float(f[b"ts"]), f[b"user_id"].decode(), f[b"item_id"].decode(), f[b"type"].decode())
        for _, f in entries
    )
    assert recorded == outcomes
    labels = label(logged)
    assert labels.stats.used == len(outcomes)  # same users, shown items, in the window
    # Scored per version served: the figures of that version's answers.
    report = done.report()
    assert list(report) == [f"ranker/{version.name}"]
    m = report[f"ranker/{version.name}"]
    assert m["requests"] == 60
    assert m["ctr"] == pytest.approx(len(labels.grades) / 60)
    assert 0.0 < m["click_ndcg_at_10"] <= m["ctr"]  # 0 for an answer without a click
    assert 0.0 < m["oracle_ndcg_at_10"] < 1.0 and m["oracle_ndcg_at_10_stderr"] > 0
    assert "ranker/" in served_table(done)


def test_click_ndcg_grades_an_answer_by_what_the_shopper_did() -> None:
    assert click_ndcg([0] * 10) == 0.0
    assert click_ndcg([2] + [0] * 9) == 1.0
    # A purchase (gain 15) at rank 2 and a click (gain 3) at rank 1.
    best = 15 + 3 / np.log2(3)
    assert click_ndcg([2, 4] + [0] * 8) == pytest.approx((3 + 15 / np.log2(3)) / best)
