"""Served-list evaluation: it cannot see the answer, it splits robustly, and the
`recsvc evaluate` command prints the report docs/ranking.md documents."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from features import evaluation
from features.candidates import CandidateConfig
from features.dataset import DatasetConfig, NoTrainingGroups, build, split_log
from features.logs import EventLog, write_events
from features.synthetic import SyntheticData
from features.trainer import TrainParams, train
from recsvc.cli import main as cli
from recsvc.ranking import models
from tests.conftest import DataFiles


def _model(model_dir: Path) -> models.LoadedModel:
    [path] = models.versions(model_dir, "ranker")
    return models.load(path)


def _eval_set(
    data: SyntheticData, model: models.LoadedModel, **config: object
) -> evaluation.EvalSet:
    cfg = DatasetConfig(train_groups=0, eval_groups=300, seed=2, exclude_seen=False)
    built = build(
        data.events,
        data.catalogue,
        replace(cfg, **config),  # type: ignore[arg-type]
        neighbours=model.neighbours,
        learn_neighbours=False,
    )
    return built.test


def test_an_evaluation_without_candidate_sources_scores_zero(
    small_data: SyntheticData, model_dir: Path
) -> None:
    model = _model(model_dir)
    test = _eval_set(small_data, model, candidates=CandidateConfig(sources=()))
    report = evaluation.evaluate(test, model.predict, 300)
    assert report["groups"] > 250
    assert report["candidate_recall"] == 0.0
    assert report["served"]["model"]["ndcg_at_10"] == 0.0
    assert report["served"]["model"]["no_candidates"] == report["groups"]


def test_an_evaluation_with_the_true_item_removed_scores_zero(
    small_data: SyntheticData, model_dir: Path
) -> None:
    model = _model(model_dir)
    test = _eval_set(small_data, model)
    honest = evaluation.evaluate(test, model.predict, 300)
    assert honest["served"]["model"]["ndcg_at_10"] > 0.2  # the same groups do score
    for g in test.groups:
        keep = g.candidates != g.positive
        g.candidates, g.sources, g.matrix = g.candidates[keep], g.sources[keep], g.matrix[keep]
    blind = evaluation.evaluate(test, model.predict, 300)
    assert blind["candidate_recall"] == 0.0
    assert blind["served"]["model"]["ndcg_at_10"] == 0.0
    assert blind["served"]["model"]["hit_at_10"] == 0.0
    # The baselines' lists were built apart from the candidates: unchanged.
    assert blind["served"]["recent"] == honest["served"]["recent"]


def test_list_metrics_count_only_the_true_item_in_the_top_n() -> None:
    lists = [np.asarray([5, 7, 9]), np.asarray([1, 2]), np.asarray([], np.int64)]
    m = evaluation.list_metrics(lists, np.asarray([9, 3, 4]), 10)
    assert m["hit_at_10"] == pytest.approx(1 / 3)
    assert m["ndcg_at_10"] == pytest.approx((1 / np.log2(4)) / 3)
    assert m["mrr_at_10"] == pytest.approx((1 / 3) / 3)
    assert evaluation.list_metrics(lists, np.asarray([9, 3, 4]), 2)["hit_at_2"] == 0.0


def test_a_log_with_one_event_months_early_trains_normally(small_data: SyntheticData) -> None:
    log = small_data.events
    early = log.ts[0] - 90 * 86400.0
    skewed = EventLog(
        ts=np.concatenate([[early], log.ts]),
        user=np.concatenate([log.user[:1], log.user]),
        item=np.concatenate([log.item[:1], log.item]),
        type=np.concatenate([log.type[:1], log.type]),
        user_ids=log.user_ids,
        item_ids=log.item_ids,
    )
    split = split_log(skewed, 0.2)
    # By event count, not by time range (which would put 99% of it in training).
    assert split.n_train == pytest.approx(0.8 * len(skewed), abs=5)
    data = build(skewed, small_data.catalogue, DatasetConfig(train_groups=400, eval_groups=100))
    result = train(data, TrainParams(num_trees=5, num_threads=1))
    assert len(data.train.sizes) > 100 and result.metrics["eval_groups"] > 50


def _one_event_per_user(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(
        "ts,user_id,item_id,type\n"
        + "".join(f"{1_700_000_000 + k},u{k},i{k % 5},view\n" for k in range(50))
    )
    return path


def test_a_log_without_training_groups_ends_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = _one_event_per_user(tmp_path)
    from features.logs import read_events

    data = build(read_events(events), None, DatasetConfig())
    with pytest.raises(NoTrainingGroups, match="no training groups"):
        train(data, TrainParams(num_trees=2))
    code = cli.main(["train", "--events", str(events), "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("recsvc: no training groups: of 40 sampled training events")
    assert not any("Traceback" in line for line in err)


def test_evaluate_prints_one_deterministic_json_object(
    small_files: DataFiles, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "evaluate",
        *("--events", str(small_files.events), "--items", str(small_files.items)),
        *("--model-dir", str(model_dir), "--groups", "200", "--json"),
    ]
    outputs = []
    for _ in range(2):
        assert cli.main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    report = json.loads(outputs[0])
    assert report["groups"] > 150 and report["split_ts"] > 0
    assert 0.0 < report["candidate_recall"] <= 1.0
    for name in ("model", "popular", "recent", "cooccurrence"):
        assert set(report["served"][name]) >= {"ndcg_at_10", "hit_at_10", "mrr_at_10"}
    assert report["served"]["model"]["ndcg_at_10"] > report["served"]["popular"]["ndcg_at_10"]
    assert "in_set_ranking" in report and "warning" not in report


def test_evaluating_on_events_the_model_trained_on_is_refused_unless_allowed(
    small_files: DataFiles, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "evaluate",
        *("--events", str(small_files.events), "--model-dir", str(model_dir)),
        *("--holdout", "0.5", "--groups", "50"),
    ]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "recsvc: the model was trained on events up to" in captured.err
    assert captured.out == ""
    assert cli.main([*argv, "--allow-overlap"]) == 0
    captured = capsys.readouterr()
    assert "warning: the model was trained on events up to" in captured.err
    assert "served lists at 10" in captured.out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--split-at", "9e12"), "recsvc: no held-out events from the split at 9000000000000"),
        (("--split-at", "100"), "recsvc: no events before the split at 100"),
        (("--split-at", "nan"), "recsvc: the split time nan is not a time"),
    ],
)
def test_a_split_that_leaves_a_side_empty_is_one_line(
    small_files: DataFiles,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    for command in (
        ["train", "--model-dir", str(tmp_path)],
        ["evaluate", "--model-dir", str(model_dir)],
    ):
        assert cli.main([*command, "--events", str(small_files.events), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message), err
    assert not (tmp_path / "ranker").exists()  # nothing was published


def test_counts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--trees", "0"])
    assert stop.value.code == 2
    assert "--trees: 0 is not a positive number" in capsys.readouterr().err


def test_write_events_round_trip_keeps_the_split(tmp_path: Path, small_data: SyntheticData) -> None:
    path = tmp_path / "e.csv"
    write_events(path, small_data.events)
    from features.logs import read_events

    a, b = split_log(small_data.events, 0.2), split_log(read_events(path), 0.2)
    assert (a.n_train, a.n_events) == (b.n_train, b.n_events)


def test_the_evaluated_events_do_not_depend_on_the_training_groups(
    small_data: SyntheticData,
) -> None:
    def positives(train_groups: int) -> list[int]:
        config = DatasetConfig(train_groups=train_groups, eval_groups=100, seed=4)
        return [g.positive for g in build(small_data.events, None, config).test.groups]

    assert positives(0) == positives(300)


def test_the_user_clustered_error_is_wider_when_a_user_repeats_one_outcome() -> None:
    # Ten users; one of them gives half the events, all hits: their events move together.
    lists = [np.asarray([1])] * 10 + [np.asarray([2])] * 10
    positives = np.asarray([1] * 10 + [1] * 10)
    users = np.asarray([0] * 10 + list(range(1, 11)))
    m = evaluation.list_metrics(lists, positives, 10, users)
    assert m["ndcg_at_10"] == 0.5
    assert m["ndcg_stderr_by_user"] > 2 * m["ndcg_stderr"]
