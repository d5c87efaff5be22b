"""`recsvc train --impressions`, `recsvc evaluate --impressions` and
`recsvc train --shuffle-labels` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from features.dataset import split_log
from features.logs import read_events
from recsvc.cli import main as cli
from recsvc.ranking import models
from tests.conftest import DataFiles
from tests.helpers import click_events, impressions_for, write_impressions

SMALL_TRAIN = ("--train-groups", "600", "--trees", "15", "--groups", "200")


@pytest.fixture(scope="module")
def impressions_dir(small_files: DataFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Impressions whose outcomes are clicks of the small log: 300 before the
    default split, 150 after it."""
    log = read_events(small_files.events)
    split = split_log(log, 0.2)
    out = tmp_path_factory.mktemp("impressions")
    write_impressions(out, impressions_for(log, click_events(log, 0, split.n_train, 300)), "a")
    held_out = click_events(log, split.n_train, len(log), 150, seed=1)
    write_impressions(out, impressions_for(log, held_out, seed=1, prefix="h"), "b")
    (out / "impressions-c.jsonl.open").write_text("{not read\n")
    return out


def test_train_with_impressions_records_where_groups_came_from_and_both_protocols(
    small_files: DataFiles,
    impressions_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "train",
        *("--events", str(small_files.events), "--items", str(small_files.items)),
        *("--model-dir", str(tmp_path), "--impressions", str(impressions_dir), *SMALL_TRAIN),
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "training groups: 300 from impressions" in err
    assert "position bias factors (position: factor, 0 = not shown): 0:" in err
    assert "impression protocol at 10 on 150 held-out impressions" in err
    assert "never shown counts as not relevant" in err
    [path] = models.versions(tmp_path, "ranker")
    meta = json.loads((path / "meta.json").read_text())
    info = meta["data"]["impressions"]
    assert info["train_groups_from_impressions"] == 300
    assert info["train_groups_sampled_negatives"] == meta["data"]["train_groups"] - 300
    assert info["held_out_impressions"] == 150 and info["label_window_secs"] == 1800.0
    assert set(info["position_bias"]) == {str(p) for p in range(11)}
    assert info["labels"]["used_as_labels"] == 450
    assert meta["data"]["impressions_dir"] == str(impressions_dir)
    evaluation = meta["evaluation"]
    assert evaluation["served"]["model"]["ndcg_at_10"] > 0  # the next-event protocol
    protocol = evaluation["impressions"]
    assert protocol["groups"] == 150
    assert set(protocol["served"]) == {"model", "popular", "recent", "cooccurrence"}
    assert set(protocol["reranked_shown"]) == {"model", "logged_order"}
    files = {Path(f["path"]).name for f in meta["data"]["files"]}
    assert {"impressions-a.jsonl", "outcomes-b.jsonl"} <= files
    assert "impressions-c.jsonl.open" not in files


def test_evaluate_adds_the_impression_protocol_and_leaves_the_next_event_one_alone(
    small_files: DataFiles,
    model_dir: Path,
    impressions_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "evaluate",
        *("--events", str(small_files.events), "--items", str(small_files.items)),
        *("--model-dir", str(model_dir), "--groups", "150", "--json"),
    ]
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main([*argv, "--impressions", str(impressions_dir)]) == 0
    both = json.loads(capsys.readouterr().out)
    protocol = both.pop("impressions")
    assert both == plain
    assert protocol["groups"] == 150 and protocol["labelled_impressions"] == 150
    model = protocol["served"]["model"]["ndcg_at_10"]
    assert model > protocol["served"]["popular"]["ndcg_at_10"]
    assert 0.0 < protocol["reranked_shown"]["logged_order"]["ndcg_at_10"] <= 1.0
    assert cli.main([*argv[:-1], "--impressions", str(impressions_dir)]) == 0
    out = capsys.readouterr().out
    assert "served lists at 10 on" in out and "re-ranked shown model" in out


def test_shuffle_labels_trains_a_model_that_says_so(
    small_files: DataFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        *("--events", str(small_files.events), "--items", str(small_files.items)),
        *("--model-dir", str(tmp_path), "--shuffle-labels", *SMALL_TRAIN),
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    [path] = models.versions(tmp_path, "ranker")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["data"]["labels_shuffled"] is True
    assert meta["params"]["shuffle_labels"] is True
    assert meta["evaluation"]["labels_shuffled"] is True
    # It ranks no better than popularity: nothing real was learned.
    assert meta["metrics"]["ndcg_at_10"] < 2 * meta["metrics"]["popular_ndcg_at_10"]


def test_a_missing_impressions_directory_is_one_line(
    small_files: DataFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--events", str(small_files.events), "--model-dir", str(tmp_path)]
    assert cli.main([*argv, "--impressions", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no impressions directory {tmp_path}/none")
