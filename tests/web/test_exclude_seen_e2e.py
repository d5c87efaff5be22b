"""A catalogue of things used once (every event a new item for its user, as in
MovieLens): the model learns to never serve what the user touched, and the
service honours it, unless told otherwise (end to end over HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.dataset import DatasetConfig
from features.logs import EventLog, write_catalogue, write_events
from features.synthetic import SyntheticData
from features.trainer import TrainParams
from recsvc.cli import training
from recsvc.cli.seed import seed
from recsvc.ranking import models
from recsvc.settings import Settings
from recsvc.web.app import create_app
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio


def _first_touches(log: EventLog) -> EventLog:
    """The log with every repeat of a (user, item) pair dropped."""
    pairs = log.user.astype(np.int64) * len(log.item_ids) + log.item
    _, first = np.unique(pairs, return_index=True)
    keep = np.sort(first)
    return EventLog(
        log.ts[keep], log.user[keep], log.item[keep], log.type[keep], log.user_ids, log.item_ids
    )


@pytest.fixture(scope="module")
def once_models(small_data: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("once")
    events, items = base / "events.csv", base / "items.csv"
    write_events(events, _first_touches(small_data.events))
    write_catalogue(items, small_data.catalogue)
    root = base / "models"
    training.train_files(
        events,
        items,
        root,
        "ranker",
        DatasetConfig(train_groups=2000, eval_groups=300),
        TrainParams(num_trees=20, num_threads=2),
        progress=False,
    )
    return root


async def _served_and_seen(
    redis_url: str, models_dir: Path, users: list[str], **settings: Any
) -> list[tuple[set[str], set[str]]]:
    app = create_app(settings_for(models_dir, **settings), redis_url)
    out = []
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        for user in users:
            rec = await (await c.post("/v1/recommendations", json={"user_id": user})).json()
            assert rec["strategy"] == "model", rec
            feats = await (await c.get(f"/v1/users/{user}/features")).json()
            served = {i["item_id"] for i in rec["items"]}
            out.append((served, {r["item_id"] for r in feats["recent"]}))
    return out


async def test_a_once_only_catalogue_never_serves_what_the_user_touched(
    aredis: Redis, redis_url: str, small_data: SyntheticData, once_models: Path
) -> None:
    [path] = models.versions(once_models, "ranker")
    meta = models.read_meta(path)
    assert meta["exclude_seen"] is True and meta["evaluation"]["repeat_share"] == 0.0
    log = _first_touches(small_data.events)
    await seed(aredis, Settings(user_ttl_days=0), small_data.catalogue, log, progress=False)
    users = [f"u{k}" for k in range(0, 40)]
    auto = await _served_and_seen(redis_url, once_models, users)
    assert all(served and not served & seen for served, seen in auto)
    # Told to allow them, the same model serves the users' own items again.
    never = await _served_and_seen(redis_url, once_models, users, exclude_seen="never")
    assert sum(len(served & seen) for served, seen in never) > 20
