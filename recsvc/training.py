"""`recsvc train`: replay a log, build point-in-time groups, fit, evaluate, register."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from features.dataset import DatasetConfig, build
from features.logs import ReadReport, read_catalogue_report, read_log
from features.trainer import TrainParams, train
from recsvc import models

METRIC_ROWS = ("ndcg_at_10", "recall_at_10", "recall_at_50", "mrr")


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    path: Path
    metrics: dict[str, float]
    seconds: float
    reports: list[ReadReport]


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
    reports = []
    catalogue = None
    if items_path:
        catalogue, items_report = read_catalogue_report(items_path)
        reports.append(items_report)
    log, events_report = read_log(events_path)
    reports.append(events_report)
    with tqdm(
        total=len(log), unit="ev", desc="replay", disable=not progress, mininterval=0.5
    ) as bar:
        data = build(log, catalogue, data_config, progress=bar.update)
    with tqdm(
        total=params.num_trees, unit="tree", desc="train", disable=not progress, mininterval=0.5
    ) as bar:
        result = train(data, params, progress=bar.update)
    meta = {
        "metrics": result.metrics,
        "feature_importance_gain": result.importance,
        "params": result.params,
        "data": {
            "events_file": str(events_path),
            "items_file": str(items_path) if items_path else None,
            "files": [
                {"path": r.path, "layout": r.layout, "rows": r.rows, "skipped": r.skipped}
                for r in reports
            ],
            "events": data.n_events,
            "users": data.n_users,
            "items": data.n_items,
            "train_groups": len(data.train.sizes),
            "eval_groups": len(data.test.sizes),
            "split_ts": data.split_ts,
        },
    }
    held_out = data.test.matrix() if data.test.sizes else data.train.matrix()
    path = models.save(model_dir, name, result.booster, meta, keep=keep, sample=held_out[:512])
    return TrainOutcome(path, result.metrics, time.perf_counter() - started, reports)


def metrics_table(metrics: dict[str, float]) -> str:
    """Model vs baselines, one row per metric."""
    lines = [f"{'metric':<14}{'model':>10}{'popularity':>12}{'category':>10}"]
    for m in METRIC_ROWS:
        lines.append(
            f"{m:<14}{metrics.get(m, 0):>10.4f}"
            f"{metrics.get('baseline_popularity_' + m, 0):>12.4f}"
            f"{metrics.get('baseline_category_' + m, 0):>10.4f}"
        )
    return "\n".join(lines)
