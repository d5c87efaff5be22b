"""Workers keep the PINNED markers in step with the records: the cases an
outside review found where a version a roll-out record names lost (or never
got) its marker, so a training run's pruning (models.save) deleted it. Real
redis-server, real LightGBM models, real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from recsvc.ab.rollout import RolloutStore, new_rollout
from recsvc.cli import rollouts
from recsvc.ranking import models
from recsvc.ranking.models import ModelRegistry

STATE = "{rollout}:state"


def _train(root: Path) -> None:
    """A training run: saves a new version, keeps the newest one plus pinned ones."""
    booster = models.load(models.versions(root, "ranker")[0]).booster
    models.save(root, "ranker", booster, {}, keep=1)


@pytest.mark.asyncio
async def test_a_version_copied_in_after_its_record_is_followed_gets_marked(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    """An instance with its own model directory: the record's stable version is
    still being copied in at the first poll; once the copy lands it is loaded,
    served and marked (the markers are checked against the disk every poll)."""
    root, old, _new = two_versions
    await aredis.delete(STATE)
    store = RolloutStore(aredis)
    stable = "20000101T000000000"  # promoted on another host, older than ours
    assert await store.put(new_rollout("ranker", stable, None, 1.0, (), 100), 0) is not None
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    await registry.follow(await store.all())  # not here yet: refused, old one serves
    shutil.copytree(root / "ranker" / old, root / "ranker" / stable)  # the copy lands
    await registry.follow(await store.all())
    assert registry.current is not None and registry.current.version == stable
    _train(root)
    assert (root / "ranker" / stable).is_dir(), "the record's stable version was pruned"


@pytest.mark.asyncio
async def test_a_record_this_code_cannot_parse_does_not_unmark_its_versions(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    """RolloutStore.all leaves out a record it cannot parse (e.g. one written by
    newer code during a rolling deploy); its name is not 'without a record', so
    the markers the CLI wrote for it stay."""
    root, old, _new = two_versions
    await aredis.delete(STATE)
    store = RolloutStore(aredis)
    r = await rollouts.promote(store, root, "ranker", old, None, None, 100)  # marks old
    assert (root / "ranker" / old / models.PINNED_FILE).exists()
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    await registry.follow(await store.all(), store.unparsed)  # followed while it parsed
    raw = orjson.loads(r.to_json())
    raw["status"] = "paused"  # a status newer code knows
    await aredis.hset(STATE, "ranker", orjson.dumps(raw))
    await registry.follow(await store.all(), store.unparsed)
    assert store.unparsed == {"ranker"} and await aredis.hexists(STATE, "ranker")
    _train(root)
    assert (root / "ranker" / old).is_dir(), "a version the record names was pruned"


@pytest.mark.asyncio
async def test_a_starting_worker_does_not_unmark_what_promote_just_marked(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    """A worker starting (--workers N, a restart) reads the records, then loads
    (seconds); meanwhile `recsvc models promote` writes the record and its
    marker. A marker found without a record this worker saw is not removed."""
    root, old, _new = two_versions
    await aredis.delete(STATE)
    store = RolloutStore(aredis)
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    records = await store.all()  # the worker's read: no record yet
    await rollouts.promote(store, root, "ranker", old, None, None, 100)
    await registry.follow(records)
    _train(root)  # a training run in the window before that worker's next poll
    assert (root / "ranker" / old).is_dir(), "the promoted version was pruned"
