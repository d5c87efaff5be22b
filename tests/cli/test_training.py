"""Training on a generated log, evaluation against baselines, and the model registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from features.dataset import DatasetConfig, build
from features.metrics import rank_of, summarize
from features.schema import FEATURE_NAMES, SCHEMA_HASH
from features.synthetic import SyntheticData
from features.trainer import TrainParams, train
from recsvc.errors import ModelRejected
from recsvc.ranking import models


def test_metrics_of_known_ranks() -> None:
    assert rank_of(np.array([3.0, 5.0, 1.0]), 0) == 1.0
    assert rank_of(np.array([2.0, 2.0, 2.0]), 0) == 1.0  # ties count half
    m = summarize(np.array([0.0, 9.0, 10.0]))
    assert m["recall_at_10"] == pytest.approx(2 / 3)
    assert m["ndcg_at_10"] == pytest.approx((1.0 + 1 / np.log2(11)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 10 + 1 / 11) / 3)


def test_registry_meta_and_the_served_model_beats_its_baselines(model_dir: Path) -> None:
    [path] = models.versions(model_dir, "ranker")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert meta["schema_hash"] == SCHEMA_HASH
    assert meta["created_at"]
    metrics = meta["metrics"]
    assert metrics["ndcg_at_10"] >= 3 * metrics["popular_ndcg_at_10"]
    assert metrics["ndcg_at_10"] > metrics["cooccurrence_ndcg_at_10"]
    assert metrics["ndcg_at_10"] > metrics["recent_ndcg_at_10"]
    served = meta["evaluation"]["served"]
    assert set(served) == {"model", "popular", "recent", "cooccurrence"}
    assert served["model"]["ndcg_at_10"] == metrics["ndcg_at_10"]
    # The shop repeats items, so seen items stay allowed; the table shipped with it.
    assert meta["exclude_seen"] is False
    assert meta["neighbours"]["items_with_neighbours"] > 100
    assert set(meta["feature_importance_gain"]) == set(FEATURE_NAMES)
    loaded = models.load(path)
    assert loaded.neighbours is not None and len(loaded.neighbours.ids) > 100
    x = np.zeros((5, len(FEATURE_NAMES)), np.float32)
    assert loaded.predict(x).shape == (5,)


def test_dataset_uses_only_the_past(small_data: SyntheticData) -> None:
    data = build(
        small_data.events,
        small_data.catalogue,
        DatasetConfig(train_groups=200, eval_groups=100, seed=1),
    )
    assert data.train.sizes and data.test.groups
    x = data.train.matrix()
    since_last = x[:, FEATURE_NAMES.index("u_secs_since_last_event")]
    # Point-in-time: the labelled event itself is not yet in the state, so the
    # user's last event is strictly earlier (the log has no same-ms pairs per user).
    assert np.nanmin(since_last) > 0
    assert data.train.label_vector().max() <= 4
    # Every training group is one the sources found: the labelled item leads it.
    starts = np.cumsum([0, *data.train.sizes[:-1]])
    assert (data.train.label_vector()[starts] > 0).all()
    assert (
        len(data.train.sizes) + data.train.skipped_not_retrieved + (data.train.skipped_unknown_user)
        == data.train.sampled
    )
    # The split is by event count: the last 20% of events are held out.
    assert data.split.n_train == pytest.approx(0.8 * len(small_data.events), abs=5)
    assert all(len(g.candidates) == len(g.matrix) for g in data.test.groups)


def test_training_is_deterministic_for_a_seed(small_data: SyntheticData) -> None:
    config = DatasetConfig(train_groups=300, eval_groups=100, seed=5)
    params = TrainParams(num_trees=10, num_threads=1, seed=5)
    a = train(build(small_data.events, small_data.catalogue, config), params)
    b = train(build(small_data.events, small_data.catalogue, config), params)
    assert a.metrics == b.metrics
    assert a.booster.model_to_string() == b.booster.model_to_string()


def test_registry_refuses_foreign_schema_and_serves_previous(
    model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    [good] = models.versions(root, "ranker")
    bad = root / "ranker" / "99990101T000000000"
    shutil.copytree(good, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["feature_names"] = [*meta["feature_names"][1:], "something_else"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="feature names differ"):
        models.load(bad)
    latest = models.load_latest(root, "ranker")
    assert latest is not None and latest.version == good.name


def test_registry_refuses_corrupt_model_file(model_dir: Path, tmp_path: Path) -> None:
    [good] = models.versions(model_dir, "ranker")
    broken = tmp_path / "ranker" / "v1"
    shutil.copytree(good, broken)
    (broken / "model.txt").write_text("not a model")
    with pytest.raises(ModelRejected):
        models.load(broken)


@pytest.mark.asyncio
async def test_registry_poll_keeps_serving_through_bad_versions(
    model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    [good] = models.versions(root, "ranker")
    registry = models.ModelRegistry(root, "ranker")
    registry.load_now()
    assert registry.current is not None and registry.current.version == good.name
    bad = root / "ranker" / "99990101T000000000"
    bad.mkdir()
    (bad / "meta.json").write_text("[]")
    [outcome] = await registry.reload()
    assert (outcome.status, outcome.version, outcome.refused_version) == (
        "refused",
        good.name,
        bad.name,
    )
    assert outcome.reason is not None and "not a JSON object" in outcome.reason
    assert registry.current.version == good.name
    [again] = await registry.reload()  # remembered: not loaded again, still reported
    assert again.status == "refused" and again.reason == outcome.reason
    newer = root / "ranker" / "99990102T000000000"
    shutil.copytree(good, newer)
    [loaded] = await registry.reload()
    assert (loaded.status, loaded.version, loaded.previous) == ("loaded", newer.name, good.name)
    assert registry.current.version == newer.name
    [same] = await registry.reload()
    assert same.status == "unchanged"


@pytest.mark.asyncio
async def test_a_new_model_name_falls_back_to_its_newest_good_version(
    model_dir: Path, tmp_path: Path
) -> None:
    """A name appearing while serving, whose newest version is bad: the newest good
    one serves, and the answer still reports the refusal."""
    root = tmp_path / "models"
    root.mkdir()
    registry = models.ModelRegistry(root, "ranker")
    registry.load_now()
    assert registry.current is None
    [good] = models.versions(model_dir, "ranker")
    shutil.copytree(good, root / "other" / "20200101T000000000")
    bad = root / "other" / "20990101T000000000"
    shutil.copytree(good, bad)
    (bad / "model.txt").write_text("not a model")
    [outcome] = await registry.reload()
    assert (outcome.status, outcome.version, outcome.refused_version) == (
        "refused",
        "20200101T000000000",
        bad.name,
    )
    loaded = registry.get("other")
    assert loaded is not None and loaded.version == "20200101T000000000"


@pytest.mark.asyncio
async def test_a_version_with_a_broken_neighbour_table_is_refused_and_the_old_serves(
    model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    [good] = models.versions(root, "ranker")
    bad = root / "ranker" / "99990101T000000000"
    shutil.copytree(good, bad)
    (bad / "neighbours" / "meta.json").write_text('{"format": 2, "kinds": 5}')
    registry = models.ModelRegistry(root, "ranker")
    registry.load_now()  # at start: the newest good version
    assert registry.current is not None and registry.current.version == good.name
    newer = root / "ranker" / "99990102T000000000"
    shutil.copytree(bad, newer)
    [outcome] = await registry.reload()  # while serving: refused, remembered
    assert (outcome.status, outcome.version) == ("refused", good.name)
    assert outcome.reason is not None and "neighbours/" in outcome.reason
    assert registry.current.version == good.name
