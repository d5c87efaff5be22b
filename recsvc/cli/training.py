"""`recsvc train` and `recsvc evaluate`: replay a log, learn neighbours, build
point-in-time groups, fit, and measure the lists the service would serve."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from features import evaluation, impression_eval
from features.dataset import Dataset, DatasetConfig, build
from features.impressions import ImpressionLog, read_impressions
from features.logs import Catalogue, EventLog, ReadReport, read_catalogue_report, read_log
from features.trainer import TrainParams, summary, train
from recsvc.ranking import models

BASELINE_ROWS = ("model", "popular", "recent", "cooccurrence")


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    path: Path
    metrics: dict[str, float]
    report: dict[str, Any]
    seconds: float
    reports: list[ReadReport]


def read_files(
    events_path: Path, items_path: Path | None, progress: bool = False
) -> tuple[EventLog, Catalogue | None, list[ReadReport]]:
    reports = []
    catalogue = None
    if items_path:
        catalogue, items_report = read_catalogue_report(items_path)
        reports.append(items_report)
    with tqdm(unit="row", desc="read", disable=not progress, mininterval=0.5) as bar:
        log, events_report = read_log(events_path, progress=bar.update)
    reports.append(events_report)
    return log, catalogue, reports


@contextmanager
def _stages(
    progress: bool, total: int
) -> Iterator[tuple[Callable[[str], None], Callable[[int], None]]]:
    """A stage line and a progress bar over the log (the point-in-time state) on
    stderr (when it is a terminal)."""
    bar = tqdm(total=total, unit="ev", desc="state", disable=not progress, mininterval=0.5)

    def stage(name: str) -> None:
        if progress:
            print(f"{name}…", file=sys.stderr, flush=True)

    try:
        yield stage, bar.update
    finally:
        bar.close()


def _split_info(data: Dataset) -> dict[str, Any]:
    return {
        **data.split.summary(),
        "repeat_share": data.repeat_share,
        "exclude_seen": data.config.exclude_seen,
    }


def _impressions(path: Path | None, reports: list[ReadReport]) -> ImpressionLog | None:
    if path is None:
        return None
    logged = read_impressions(path)
    reports.extend(logged.reports)
    return logged


def _impression_info(data: Dataset) -> dict[str, Any] | None:
    """Where the training groups came from, and what became of the impressions."""
    if data.impressions is None:
        return None
    t = data.train
    return {
        "train_groups_from_impressions": t.from_impressions,
        "train_groups_sampled_negatives": t.from_sampled,
        "sampled_skipped_as_impression_outcome": t.skipped_impression_outcome,
        "label_window_secs": data.config.label_window,
        **data.impressions.summary(),
    }


def train_files(
    events_path: Path,
    items_path: Path | None,
    model_dir: Path,
    name: str,
    data_config: DatasetConfig,
    params: TrainParams,
    progress: bool = True,
    keep: int = models.KEEP_VERSIONS,
    impressions_path: Path | None = None,
) -> TrainOutcome:
    """``impressions_path``: a directory of logged impressions and outcomes to train
    on (and evaluate the impression protocol with) beside the sampled groups."""
    started = time.perf_counter()
    log, catalogue, reports = read_files(events_path, items_path, progress)
    logged = _impressions(impressions_path, reports)
    with _stages(progress, len(log)) as (stage, tick):
        data = build(log, catalogue, data_config, progress=tick, stage=stage, impressions=logged)
    with tqdm(
        total=params.num_trees, unit="tree", desc="train", disable=not progress, mininterval=0.5
    ) as bar:
        result = train(data, params, progress=bar.update)
    report = {**_split_info(data), **result.report}
    info = _impression_info(data)
    if info is not None:
        info["position_bias"] = (
            {str(k): v for k, v in result.position_bias.items()}
            if result.position_bias is not None
            else None
        )
        report["training_impressions"] = info
    if params.shuffle_labels:
        report["labels_shuffled"] = True
    table = data.neighbours
    meta: dict[str, Any] = {
        "metrics": result.metrics,
        "evaluation": report,
        "exclude_seen": data.config.exclude_seen,
        # The sources and quotas the groups were built with (serving may differ).
        "candidates": asdict(data.config.candidates),
        "neighbours": table.info if table is not None else None,
        "feature_importance_gain": result.importance,
        "params": result.params,
        "data": {
            "events_file": str(events_path),
            "items_file": str(items_path) if items_path else None,
            "files": [
                {"path": r.path, "layout": r.layout, "rows": r.rows, "skipped": r.skipped}
                for r in reports
            ],
            "events": len(log),
            "users": data.n_users,
            "items": data.n_items,
            "train_groups": len(data.train.sizes),
            "train_groups_sampled": data.train.sampled,
            "train_skipped_not_retrieved": data.train.skipped_not_retrieved,
            "train_skipped_unknown_user": data.train.skipped_unknown_user,
            "eval_groups": len(data.test.groups),
            **data.split.summary(),
        },
    }
    if info is not None:
        meta["data"]["impressions_dir"] = str(impressions_path)
        meta["data"]["impressions"] = info
    if params.shuffle_labels:
        # Never a model to serve for real: say so where every reader looks.
        meta["data"]["labels_shuffled"] = True
    # Real held-out rows (a compiled scorer must reproduce the native scores on them).
    held_out = [g.matrix for g in data.test.groups[:8] if len(g.matrix)]
    sample = np.concatenate(held_out) if held_out else data.train.matrix()
    path = models.save(
        model_dir, name, result.booster, meta, keep=keep, sample=sample[:512], neighbours=table
    )
    return TrainOutcome(path, result.metrics, report, time.perf_counter() - started, reports)


def evaluate_files(
    events_path: Path,
    items_path: Path | None,
    model_path: Path,
    data_config: DatasetConfig,
    progress: bool = True,
    exclude_seen: bool | None = None,
    impressions_path: Path | None = None,
) -> tuple[dict[str, Any], list[ReadReport]]:
    """The served-list report of a saved model version on a log (trains nothing).
    ``exclude_seen`` None: as the model's training decided. ``impressions_path``:
    also the impression protocol on the held-out impressions there."""
    model = models.load(model_path)
    log, catalogue, reports = read_files(events_path, items_path, progress)
    logged = _impressions(impressions_path, reports)
    seen = model.exclude_seen if exclude_seen is None else exclude_seen
    config = replace(data_config, train_groups=0, exclude_seen=seen)
    with _stages(progress, len(log)) as (stage, tick):
        data = build(
            log,
            catalogue,
            config,
            progress=tick,
            stage=stage,
            neighbours=model.neighbours,
            learn_neighbours=False,
            impressions=logged,
            train_impressions=False,
        )
        stage("scoring")
        report = evaluation.evaluate(data.test, model.predict, data.n_items)
        if data.impression_test is not None:
            report["impressions"] = impression_eval.evaluate(data.impression_test, model.predict)
    out: dict[str, Any] = {
        "model": {"name": model.name, "version": model.version},
        **_split_info(data),
        **report,
        "metrics": summary(report),
    }
    trained_until = model.meta.get("data", {}).get("split_ts")
    if isinstance(trained_until, int | float) and trained_until > data.split_ts:
        out["warning"] = (
            f"the model was trained on events up to {trained_until:.0f}, after this "
            f"evaluation's split at {data.split_ts:.0f}: held-out events may be in its training"
        )
    return out, reports


def metrics_table(report: dict[str, Any]) -> str:
    """Served lists of the model and the baselines, one row per list."""
    n = report["top_n"]
    lines = [
        f"served lists at {n} on {report['groups']} held-out events "
        f"(candidate recall {report['candidate_recall']:.3f})",
        f"{'list':<14}{'ndcg':>9}{'± user':>8}{'hit':>9}{'mrr':>9}{'coverage':>10}",
    ]
    for name in BASELINE_ROWS:
        m = report["served"].get(name)
        if m is None:
            continue
        lines.append(
            f"{name:<14}{m[f'ndcg_at_{n}']:>9.4f}{m['ndcg_stderr_by_user']:>8.4f}"
            f"{m[f'hit_at_{n}']:>9.4f}{m[f'mrr_at_{n}']:>9.4f}{m['coverage']:>10.3f}"
        )
    by_source = ", ".join(f"{k} {v:.3f}" for k, v in report["recall_by_source"].items() if v)
    lines.append(f"recall by source: {by_source or '-'}")
    if "in_set_ranking" in report:
        lines.append(
            f"in-set ranking (true item put into the candidates; not served): "
            f"ndcg@10 {report['in_set_ranking']['ndcg_at_10']:.4f}"
        )
    if "training_impressions" in report:
        lines.append(_training_impressions(report["training_impressions"]))
    if "impressions" in report:
        lines.append(impressions_table(report["impressions"]))
    return "\n".join(lines)


def _training_impressions(info: dict[str, Any]) -> str:
    bias = info.get("position_bias")
    factors = " ".join(f"{k}:{v:+.3f}" for k, v in bias.items()) if bias else "-"
    return (
        f"training groups: {info['train_groups_from_impressions']} from impressions, "
        f"{info['train_groups_sampled_negatives']} sampled negatives "
        f"({info['sampled_skipped_as_impression_outcome']} sampled events left to their "
        f"impression); impressions {info['train_impressions']} before the split, dropped: "
        f"{info['dropped_no_positive']} no positive, {info['dropped_one_grade']} one grade, "
        f"{info['dropped_unknown_user']} unknown user; {info['shown_items_unknown']} shown "
        f"items unknown; outcomes: {info['labels']['used_as_labels']} used as labels, "
        f"{info['labels']['ignored_user_mismatch']} of another user ignored\n"
        f"position bias factors (position: factor, 0 = not shown): {factors}"
    )


def impressions_table(report: dict[str, Any]) -> str:
    """The impression protocol: served lists and re-ranked shown lists, one row each."""
    n = report["top_n"]
    lines = [
        f"impression protocol at {n} on {report['groups']} held-out impressions with an "
        f"outcome (of {report['held_out_impressions']}; candidate recall of labelled items "
        f"{report['candidate_recall']:.3f})",
        f"  note: {impression_eval.NOTE}",
        f"{'list':<30}{'ndcg':>9}{'± user':>8}{'hit':>9}",
    ]
    rows = [(f"served {k}", m) for k, m in report["served"].items()]
    rows += [(f"re-ranked shown {k}", m) for k, m in report["reranked_shown"].items()]
    for name, m in rows:
        lines.append(
            f"{name:<30}{m[f'ndcg_at_{n}']:>9.4f}{m['ndcg_stderr_by_user']:>8.4f}"
            f"{m[f'hit_at_{n}']:>9.4f}"
        )
    return "\n".join(lines)
