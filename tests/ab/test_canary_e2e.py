"""Canary roll-outs end to end: a real server on 127.0.0.1 over a real
redis-server, real LightGBM versions, and the simulator's shoppers (known
tastes) reacting to what they are shown. The controller inside the service
steps a good version up to everyone and rolls a bad one back, naming the
guardrail, with no hand step between `recsvc models promote` and the end.

The population is the small test shop's 400 users, so the first step is 10%
(about 40 users) rather than the default 5% (20 users, the guardrails' floor).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.dataset import DatasetConfig, build
from features.logs import read_catalogue_report, read_log
from features.trainer import TrainParams, train
from recsvc.ab.rollout import PROMOTED, ROLLED_BACK, Rollout, RolloutStore
from recsvc.cli import rollouts
from recsvc.cli.simulate import simulate
from recsvc.ranking import models
from recsvc.web.app import create_app
from tests.conftest import SMALL, TEST_AUTH, TEST_KEY, TEST_KEYS, DataFiles, settings_for

pytestmark = pytest.mark.asyncio
DATA = DatasetConfig(train_groups=3000, eval_groups=200)
PARAMS = TrainParams(num_trees=60, num_threads=2)


def _bad_version(files: DataFiles, root: Path) -> str:
    """A deliberately bad version: trained on inverted labels (in each group the
    item the shopper chose is the one negative, the others positives), so it
    ranks what shoppers want last. A version trained on shuffled labels learns
    noise whose harm varies from one training to the next: in this 400-user
    shop (about 40 canary users at 10%) the guardrails caught one at 10% in
    most runs, but at 50% in one CI run, and once it changed nothing at all."""
    log, _ = read_log(files.events)
    catalogue, _ = read_catalogue_report(files.items)
    data = build(log, catalogue, DATA)
    data.train.labels = [np.where(labels > 0, 0.0, 1.0) for labels in data.train.labels]
    result = train(data, TrainParams(num_trees=60, num_threads=2))
    meta = {"exclude_seen": data.config.exclude_seen, "note": "inverted labels"}
    return models.save(root, "ranker", result.booster, meta).name


@pytest.fixture
def registry_root(model_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    return root


def _app(registry_root: Path, redis_url: str) -> TestClient[Any, Any]:
    settings = settings_for(
        registry_root,
        api_keys=TEST_KEYS,
        unknown_items="create",
        rollout_poll_secs=0.2,
        canary_tick_secs=0.25,
        canary_outcome_wait_secs=0.5,
    )
    app = create_app(settings, redis_url)
    return TestClient(TestServer(app, host="127.0.0.1"), headers=TEST_AUTH)


@pytest_asyncio.fixture
async def served(
    seeded: Redis, redis_url: str, registry_root: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    await seeded.delete("{rollout}:state", "{rollout}:controller")
    async with _app(registry_root, redis_url) as c:
        yield c


async def _shop_until(
    client: TestClient[Any, Any],
    store: RolloutStore,
    done: Callable[[Rollout], bool],
    seconds: float,
) -> tuple[Rollout, list[float]]:
    """Shoppers until the roll-out is decided (or time is up): the record then,
    and every share it ran at."""
    host = str(client.make_url("")).rstrip("/")
    shop = asyncio.create_task(
        simulate(host, SMALL.n_users, seconds, 40_000, SMALL, concurrency=4, seed=5, key=TEST_KEY)
    )
    shares: list[float] = []
    deadline = time.monotonic() + seconds
    r = await store.get("ranker")
    try:
        while time.monotonic() < deadline and not shop.done():
            r = await store.get("ranker")
            assert r is not None
            if r.share and (not shares or shares[-1] != r.share):
                shares.append(r.share)
            if done(r):
                break
            await asyncio.sleep(0.1)
    finally:
        shop.cancel()
        await asyncio.gather(shop, return_exceptions=True)
    assert r is not None
    return r, shares


@pytest.mark.timeout(300)
async def test_a_good_version_reaches_everyone_without_a_hand_step(
    served: TestClient[Any, Any],
    seeded: Redis,
    redis_url: str,
    registry_root: Path,
    small_files: DataFiles,
) -> None:
    """The good version is the fixture's model (copied in as the newest version),
    the stable one it replaces is worse (inverted labels, as the bad version
    below). With two equal versions this test is an A/A run through three
    steps and a restart: the guardrails
    roll an equal version back by chance now and then by design (measured by
    loadtest/guardrails_aa.py, about 1 step in 1,000 at this size), and one CI
    run did (29% vs 65% clicks per impression at a step's first looks after
    the restart), which 33 local runs (alone, under a CPU hog, and in the
    tests/ab session) never showed again. What this test is for is the
    mechanics: steps, the restart, promotion, and no hand step; a better version
    shows them without a coin flip in the way."""
    (trained,) = [p.name for p in models.versions(registry_root, "ranker")]
    stable = _bad_version(small_files, registry_root)
    # The good version is also the newest on disk, as a retrain's is: the record,
    # not the directory, must decide who gets it.
    good = "29991231T000000000"
    shutil.copytree(registry_root / "ranker" / trained, registry_root / "ranker" / good)
    store = RolloutStore(seeded)
    # A record pins the name: the newest version on disk serves only the canary slice.
    await rollouts.promote(store, registry_root, "ranker", stable, None, None, 150)
    await rollouts.promote(store, registry_root, "ranker", good, "10%", "25%,50%", 150)
    await asyncio.sleep(0.5)  # every worker follows the record

    # Visible in answers: users of the slice get the canary's version.
    r = await store.get("ranker")
    assert r is not None and r.running
    versions = {}
    for user in (f"u{k}" for k in range(60)):
        resp = await served.post("/v1/recommendations", json={"user_id": user, "n": 5})
        body = await resp.json()
        if body["strategy"] == "model":
            versions[user] = body["model"]["version"]
    assert versions and all(v == (good if r.in_canary(u) else stable) for u, v in versions.items())
    assert good in versions.values()

    # A restart in the middle (every worker gone, the lease with them): the record
    # and the logs carry the roll-out on.
    r, first = await _shop_until(served, store, lambda r: r.share >= 0.25, 120.0)
    assert r.running and first == [0.1, 0.25], (r.reason, r.checks)
    metrics = await (await served.get("/metrics")).text()
    assert 'recsvc_rollout_recommendation_duration_seconds_count{arm="canary"' in metrics
    await served.close()
    await seeded.delete("{rollout}:controller")
    async with _app(registry_root, redis_url) as again:
        r, shares = await _shop_until(again, store, lambda r: not r.running, 120.0)
        if r.status != PROMOTED:  # the whole record: every arm's figures at the decision
            pytest.fail(f"not promoted: {json.dumps(r.body(), indent=1, default=str)}")
        assert r.stable == good and shares == [0.25, 0.5]
        assert [h["event"] for h in r.history][-4:] == [
            "started",
            "stepped_up",
            "stepped_up",
            "promoted",
        ]
        await asyncio.sleep(0.5)
        resp = await again.post("/v1/recommendations", json={"user_id": "u1", "n": 5})
        assert (await resp.json())["model"]["version"] == good


@pytest.mark.timeout(300)
async def test_a_bad_version_is_rolled_back_before_a_quarter_of_users(
    served: TestClient[Any, Any], seeded: Redis, registry_root: Path, small_files: DataFiles
) -> None:
    (stable,) = [p.name for p in models.versions(registry_root, "ranker")]
    bad = _bad_version(small_files, registry_root)
    store = RolloutStore(seeded)
    await rollouts.promote(store, registry_root, "ranker", bad, "10%", "25%,50%", 800)
    r, shares = await _shop_until(served, store, lambda r: not r.running, 120.0)
    assert r.status == ROLLED_BACK, (r.reason, r.checks)
    assert shares == [0.1]  # never reached 25%
    # Its shoppers click less, and buy less: either guardrail may see it first.
    guardrail = r.history[-1]["guardrail"]
    assert guardrail in ("ctr", "conversion"), r.reason
    assert r.reason is not None and r.reason.startswith(f"{guardrail}: "), r.reason
    await asyncio.sleep(0.5)
    for user in ("u1", "u2", "u3"):
        resp = await served.post("/v1/recommendations", json={"user_id": user, "n": 5})
        body = await resp.json()
        assert body["strategy"] != "model" or body["model"]["version"] == stable
