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

from features import evaluation
from features.dataset import Dataset, DatasetConfig, build
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
    events_path: Path, items_path: Path | None
) -> tuple[EventLog, Catalogue | None, list[ReadReport]]:
    reports = []
    catalogue = None
    if items_path:
        catalogue, items_report = read_catalogue_report(items_path)
        reports.append(items_report)
    log, events_report = read_log(events_path)
    reports.append(events_report)
    return log, catalogue, reports


@contextmanager
def _stages(
    progress: bool, total: int
) -> Iterator[tuple[Callable[[str], None], Callable[[int], None]]]:
    """A stage line and a replay progress bar on stderr (when it is a terminal)."""
    bar = tqdm(total=total, unit="ev", desc="replay", disable=not progress, mininterval=0.5)

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


def train_files(
    events_path: Path,
    items_path: Path | None,
    model_dir: Path,
    name: str,
    data_config: DatasetConfig,
    params: TrainParams,
    progress: bool = True,
    keep: int = models.KEEP_VERSIONS,
) -> TrainOutcome:
    started = time.perf_counter()
    log, catalogue, reports = read_files(events_path, items_path)
    with _stages(progress, len(log)) as (stage, tick):
        data = build(log, catalogue, data_config, progress=tick, stage=stage)
    with tqdm(
        total=params.num_trees, unit="tree", desc="train", disable=not progress, mininterval=0.5
    ) as bar:
        result = train(data, params, progress=bar.update)
    report = {**_split_info(data), **result.report}
    table = data.neighbours
    meta = {
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
) -> tuple[dict[str, Any], list[ReadReport]]:
    """The served-list report of a saved model version on a log (trains nothing).
    ``exclude_seen`` None: as the model's training decided."""
    model = models.load(model_path)
    log, catalogue, reports = read_files(events_path, items_path)
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
        )
        stage("scoring")
        report = evaluation.evaluate(data.test, model.predict, data.n_items)
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
    return "\n".join(lines)
