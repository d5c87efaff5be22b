"""LightGBM lambdarank training and its served-list evaluation (the only lightgbm user here).

When the groups hold logged impressions, each row's served position goes to
LightGBM's position-debiased lambdarank (``lgb.Dataset(position=...)``): it
learns a bias factor per position id alongside the trees, so what was clicked
because it was shown first does not all count as relevance. The factors are
used in training only; serving scores items as before. LightGBM reports them
only in its debug log, which is read while training for ``position_bias``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from features import evaluation, impression_eval
from features.dataset import Dataset, NoTrainingGroups
from features.schema import CATEGORICAL_FEATURES, FEATURE_NAMES

# LightGBM logs the position bias factors only at this verbosity (debug).
DEBUG = 2
# LightGBM's debug lines of the position bias table: "position  bias_factor".
_BIAS_HEADER = "bias_factor"
_BIAS_ROW = re.compile(r"\[Debug\]\s+(-?\d+)\s+(\S+)\s*$")


@dataclass(frozen=True, slots=True)
class TrainParams:
    # 100 trees at 0.1 matched 300 at 0.05 on the demo log (NDCG@10 0.383 vs
    # 0.386) and score 200 candidates 2.8x faster (0.59 vs 1.64 ms).
    num_trees: int = 100
    learning_rate: float = 0.1
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    num_threads: int = 0
    seed: int = 7
    # For testing guardrails only: labels permuted within each group, so the
    # model learns nothing real.
    shuffle_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def lightgbm(self) -> dict[str, Any]:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class TrainResult:
    booster: lgb.Booster
    metrics: dict[str, float]
    report: dict[str, Any]
    importance: dict[str, float]
    params: dict[str, Any]
    # Position id -> learned bias factor (None: trained without positions).
    position_bias: dict[int, float] | None = None


def train(
    data: Dataset, params: TrainParams, progress: Callable[[int], None] | None = None
) -> TrainResult:
    """Fit lambdarank on the training groups and evaluate the served lists on the
    held-out groups."""
    t = data.train
    if not t.sizes:
        raise NoTrainingGroups(
            f"no training groups: of {t.sampled} sampled training events "
            f"({data.split.n_train} before the split at {data.split_ts:.0f}), "
            f"{t.skipped_unknown_user} were a user's first event and "
            f"{t.skipped_not_retrieved} had an item no candidate source proposed"
        )
    labels = data.train.label_vector()
    if params.shuffle_labels:
        labels = shuffle_within_groups(labels, t.sizes, params.seed)
    positions = t.position_vector()
    train_set = lgb.Dataset(
        data.train.matrix(),
        label=labels,
        group=data.train.sizes,
        feature_name=list(FEATURE_NAMES),
        categorical_feature=list(CATEGORICAL_FEATURES),
        free_raw_data=True,
        position=positions,
    )
    callbacks = []
    if progress is not None:

        def _tick(env: lgb.callback.CallbackEnv) -> None:
            progress(1)

        callbacks.append(_tick)
    lgb_params = params.lightgbm()
    bias: dict[int, float] | None = None
    if positions is None:
        booster = lgb.train(
            lgb_params, train_set, num_boost_round=params.num_trees, callbacks=callbacks
        )
    else:
        with _debug_log() as lines:
            booster = lgb.train(
                {**lgb_params, "verbosity": DEBUG},
                train_set,
                num_boost_round=params.num_trees,
                callbacks=callbacks,
            )
        bias = position_bias(lines)
        # The model file keeps the verbosity it was trained with; the usual one.
        text = booster.model_to_string()
        quiet = f"[verbosity: {lgb_params['verbosity']}]"
        booster = lgb.Booster(model_str=text.replace(f"[verbosity: {DEBUG}]", quiet))

    def score(m: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(m, num_threads=1))

    report = evaluation.evaluate(data.test, score, data.n_items)
    if data.impression_test is not None:
        report["impressions"] = impression_eval.evaluate(data.impression_test, score)
    gains = booster.feature_importance(importance_type="gain")
    importance = {
        name: float(g) for name, g in zip(booster.feature_name(), gains.tolist(), strict=True)
    }
    return TrainResult(
        booster=booster,
        metrics=summary(report),
        report=report,
        importance=importance,
        params={**lgb_params, **{k: v for k, v in asdict(params).items() if k != "extra"}},
        position_bias=bias,
    )


def shuffle_within_groups(labels: np.ndarray, sizes: list[int], seed: int) -> np.ndarray:
    """``labels`` permuted within each group (seeded): the grades a group holds stay,
    which row holds them is noise."""
    rng = np.random.default_rng([seed, 3])
    out = labels.copy()
    start = 0
    for size in sizes:
        out[start : start + size] = rng.permutation(out[start : start + size])
        start += size
    return out


@contextmanager
def _debug_log() -> Iterator[list[str]]:
    """LightGBM's log lines while the block runs, kept instead of printed (training
    runs quiet otherwise, at verbosity -1)."""
    lines: list[str] = []
    basic = lgb.basic
    previous = (basic._LOGGER, basic._INFO_METHOD_NAME, basic._WARNING_METHOD_NAME)

    class Collect:
        def info(self, message: str) -> None:
            lines.append(message)

        def warning(self, message: str) -> None:
            lines.append(message)

    lgb.register_logger(Collect())
    try:
        yield lines
    finally:
        # LightGBM's log level is one per process, set by the last parameters it
        # read: back to quiet, or every later model load logs at debug level.
        lgb.Dataset(np.zeros((2, 1)), params={"verbosity": -1}).construct()
        lgb.register_logger(*previous)


def position_bias(lines: list[str]) -> dict[int, float] | None:
    """The last position bias table LightGBM logged (after the last tree)."""
    start = max((k for k, line in enumerate(lines) if _BIAS_HEADER in line), default=None)
    if start is None:
        return None
    out: dict[int, float] = {}
    for line in lines[start + 1 :]:
        m = _BIAS_ROW.search(line.strip())
        if m is None:
            break
        out[int(m.group(1))] = float(m.group(2))
    return dict(sorted(out.items())) or None


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The headline figures of a served-list report, flat (``meta.json`` "metrics")."""
    out: dict[str, float] = {}
    n = report["top_n"]
    for name, m in report["served"].items():
        prefix = "" if name == "model" else f"{name}_"
        for k in (f"ndcg_at_{n}", f"hit_at_{n}", f"mrr_at_{n}"):
            out[prefix + k] = float(m[k])
    out["candidate_recall"] = float(report["candidate_recall"])
    out["eval_groups"] = float(report["groups"])
    if "in_set_ranking" in report:
        out[f"in_set_ndcg_at_{n}"] = float(report["in_set_ranking"]["ndcg_at_10"])
    return out
