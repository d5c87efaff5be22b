"""The trainer with impression groups (position-debiased lambdarank) and with
shuffled labels (a deliberately useless model for guardrail tests)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from features.dataset import DatasetConfig, build, split_log
from features.synthetic import SyntheticData
from features.trainer import TrainParams, shuffle_within_groups, train
from tests.helpers import click_events, impressions_for

PARAMS = TrainParams(num_trees=30, num_threads=1, seed=4)


def test_shuffling_permutes_labels_within_each_group_only() -> None:
    labels = np.asarray([4.0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 3])
    sizes = [4, 5, 2]
    out = shuffle_within_groups(labels, sizes, seed=1)
    assert not np.array_equal(out, labels)
    starts = np.cumsum([0, *sizes[:-1]])
    for start, size in zip(starts.tolist(), sizes, strict=True):
        assert sorted(out[start : start + size]) == sorted(labels[start : start + size])
    np.testing.assert_array_equal(out, shuffle_within_groups(labels, sizes, seed=1))


def test_a_model_trained_on_shuffled_labels_learns_nothing_real(
    small_data: SyntheticData,
) -> None:
    data = build(
        small_data.events, small_data.catalogue, DatasetConfig(train_groups=1500, eval_groups=300)
    )
    real = train(data, PARAMS)
    noise = train(data, replace(PARAMS, shuffle_labels=True))
    assert real.metrics["ndcg_at_10"] > 0.3
    assert noise.metrics["ndcg_at_10"] < 0.5 * real.metrics["ndcg_at_10"]
    assert noise.params["shuffle_labels"] is True and real.position_bias is None


def test_impression_groups_teach_position_bias_factors_and_both_protocols_report(
    small_data: SyntheticData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = small_data.events
    config = DatasetConfig(train_groups=500, eval_groups=200)
    split = split_log(log, config.holdout)
    # Clicks mostly on the first positions of lists of otherwise random items.
    logged = impressions_for(log, click_events(log, 0, split.n_train, 600, seed=5), seed=5)
    result = train(build(log, small_data.catalogue, config, impressions=logged), PARAMS)
    bias = result.position_bias
    assert bias is not None and set(bias) == {0, *range(1, 11)}
    assert bias[1] > bias[3] > bias[10]
    assert bias[0] == pytest.approx(0.0, abs=1e-6)  # sampled groups: one position, no pair
    assert "impressions" in result.report  # no held-out impressions: an empty protocol
    assert result.report["impressions"]["groups"] == 0
    # Reading the factors needed LightGBM's debug log: the model and the process
    # are quiet again (a later model load logs nothing).
    text = result.booster.model_to_string()
    assert "[verbosity: -1]" in text
    (tmp_path / "model.txt").write_text(text)
    capsys.readouterr()
    lgb.Booster(model_file=tmp_path / "model.txt")
    assert "LightGBM" not in capsys.readouterr().out
