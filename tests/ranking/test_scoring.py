"""The compiled scorer: same scores as native LightGBM on real feature matrices,
cached per model, and swapped in by the running service only once verified."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.candidates import CandidateConfig, from_sources
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import build_matrix
from features.synthetic import SyntheticData
from recsvc.ranking import models
from recsvc.ranking.scoring import Compiler, NativeScorer, boundary_rows, mismatch
from recsvc.web.app import create_app
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio


def _real_matrices(data: SyntheticData, users: int) -> list[np.ndarray]:
    """Serving-shaped matrices (200 candidates, NaNs included) from the replayed log."""
    replay = Replay(data.catalogue)
    replay.run(data.events)
    now = float(data.events.ts[-1]) + 60.0
    pop = PopularityIndex.build(replay.items, now)
    out = []
    for user_id in list(replay.users)[:users]:
        user = replay.users[user_id]
        cand = from_sources(user, replay.items, pop, CandidateConfig(), np.zeros(0, np.int64), now)
        out.append(build_matrix(user, replay.items, cand.index, now))
    return out


async def test_compiled_scores_equal_native_on_real_feature_matrices(
    model_dir: Path, small_data: SyntheticData, tmp_path: Path
) -> None:
    [version] = models.versions(model_dir, "ranker")
    booster = lgb.Booster(model_file=str(version / models.MODEL_FILE))
    native = NativeScorer(booster)
    compiler = Compiler(tmp_path / "cache")
    try:
        compiled = await compiler.compiled(version / models.MODEL_FILE)
        matrices = [
            np.load(version / models.SAMPLE_FILE),
            boundary_rows(booster),
            *_real_matrices(small_data, 40),
        ]
        assert sum(len(m) for m in matrices) > 2000
        assert any(np.isnan(m).any() for m in matrices)
        for m in matrices:
            assert mismatch(native, compiled, m) <= 1e-6
        # The object code is cached per model: a second build loads it, compiles nothing.
        [cached] = list((tmp_path / "cache").glob("*.o"))
        stamp = cached.stat().st_mtime_ns
        again = await compiler.compiled(version / models.MODEL_FILE)
        assert cached.stat().st_mtime_ns == stamp
        assert mismatch(native, again, matrices[1]) <= 1e-6
    finally:
        compiler.close()


async def test_the_service_serves_natively_until_the_compiled_scorer_is_verified(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    app = create_app(settings_for(model_dir, scorer="compiled"), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        scorers = []
        deadline = time.monotonic() + 90.0
        while time.monotonic() < deadline:
            resp = await c.post("/v1/recommendations", json={"user_id": "u3"})
            assert resp.status == 200
            assert (await resp.json())["strategy"] == "model"
            ready = await (await c.get("/readyz")).json()
            scorers.append(ready["model"]["scorer"])
            if scorers[-1] == "lleaves":
                break
            await asyncio.sleep(0.05)
        assert scorers[0] == "native" and scorers[-1] == "lleaves"
