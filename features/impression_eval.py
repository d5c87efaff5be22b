"""The impression protocol: served lists scored against what users did with a
logged answer.

For each sampled held-out impression with at least one labelled outcome,
``features.dataset`` keeps what the next-event protocol keeps (the candidates
serving would score then, their features, the baselines' lists) plus the shown
items, their features and their grades. The model's list is its top n of the
candidates; every list is scored by graded NDCG against that impression's
outcomes. The relevance comes from what the logging policy showed: an item it
never showed counts as not relevant, however good, so lists like the logged
ones are favoured. "Re-rank the shown list" orders only the shown items; the
logged order is its reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.evaluation import BASELINES, clustered_stderr
from features.metrics import top_n

NOTE = (
    "relevance comes from what the logging policy showed: an item never shown counts "
    "as not relevant, so this protocol favours lists like the logged ones"
)


@dataclass(slots=True)
class ImpressionEvalGroup:
    candidates: np.ndarray
    matrix: np.ndarray
    baselines: dict[str, np.ndarray]
    # The shown items the replay knew, in served order, and their feature rows.
    shown: np.ndarray
    shown_matrix: np.ndarray
    # Grade (> 0) of each labelled shown item, by item row.
    grades: dict[int, int]
    user: int = -1


@dataclass(slots=True)
class ImpressionEvalSet:
    groups: list[ImpressionEvalGroup] = field(default_factory=list)
    top_n: int = 10
    held_out: int = 0
    labelled: int = 0
    sampled: int = 0
    skipped_unknown_user: int = 0
    # Every labelled item was unknown to the replay: no list could hold one.
    skipped_no_known_label: int = 0


def gain(grade: int) -> float:
    """LightGBM's default label gain (2^grade - 1), which lambdarank optimises."""
    return float(2**grade - 1)


def ndcg(items: np.ndarray, grades: dict[int, int], n: int) -> float:
    """Graded NDCG at n of one list; the ideal is the labelled items best first."""
    ideal = sorted((gain(g) for g in grades.values()), reverse=True)[:n]
    best = sum(g / np.log2(k + 2.0) for k, g in enumerate(ideal))
    if best <= 0:
        return 0.0
    got = sum(gain(grades.get(i, 0)) / np.log2(k + 2.0) for k, i in enumerate(items[:n].tolist()))
    return float(got / best)


def list_metrics(
    lists: list[np.ndarray], groups: list[ImpressionEvalGroup], n: int
) -> dict[str, float]:
    """NDCG and hit rate (a labelled item in the list) at n, with the NDCG's
    standard error clustered by user."""
    if not lists:
        return {f"ndcg_at_{n}": 0.0, f"hit_at_{n}": 0.0, "ndcg_stderr_by_user": 0.0}
    values = np.asarray([ndcg(x, g.grades, n) for x, g in zip(lists, groups, strict=True)])
    hits = np.asarray(
        [bool(set(x[:n].tolist()) & g.grades.keys()) for x, g in zip(lists, groups, strict=True)]
    )
    users = np.asarray([g.user for g in groups], dtype=np.int64)
    return {
        f"ndcg_at_{n}": float(values.mean()),
        f"hit_at_{n}": float(hits.mean()),
        "ndcg_stderr_by_user": clustered_stderr(values, users),
    }


def evaluate(
    test: ImpressionEvalSet, score: Callable[[np.ndarray], np.ndarray] | None
) -> dict[str, Any]:
    """The impression protocol's report (``score`` None: baselines only)."""
    n, groups = test.top_n, test.groups
    served: dict[str, list[np.ndarray]] = {b: [g.baselines[b] for g in groups] for b in BASELINES}
    shown: dict[str, list[np.ndarray]] = {"logged_order": [g.shown for g in groups]}
    if score is not None and groups:
        rows = [np.vstack([g.matrix, g.shown_matrix]) for g in groups]
        sizes = [len(r) for r in rows]
        scores = np.split(score(np.concatenate(rows)), np.cumsum(sizes)[:-1])
        model, reranked = [], []
        for g, s in zip(groups, scores, strict=True):
            own, mine = s[: len(g.candidates)], s[len(g.candidates) :]
            model.append(g.candidates[top_n(own, n)] if len(own) else g.candidates[:0])
            reranked.append(g.shown[top_n(mine, len(mine))] if len(mine) else g.shown)
        served = {"model": model} | served
        shown = {"model": reranked} | shown
    labelled = [np.fromiter(g.grades, np.int64, len(g.grades)) for g in groups]
    return {
        "note": NOTE,
        "gain": "2^grade - 1; grades view 1, click 2, add_to_cart 3, purchase 4",
        "held_out_impressions": test.held_out,
        "labelled_impressions": test.labelled,
        "sampled": test.sampled,
        "groups": len(groups),
        "skipped_unknown_user": test.skipped_unknown_user,
        "skipped_no_known_label": test.skipped_no_known_label,
        "top_n": n,
        "candidate_recall": float(
            np.mean(
                [np.isin(x, g.candidates).mean() for x, g in zip(labelled, groups, strict=True)]
            )
        )
        if groups
        else 0.0,
        "served": {name: list_metrics(lists, groups, n) for name, lists in served.items()},
        "reranked_shown": {name: list_metrics(lists, groups, n) for name, lists in shown.items()},
    }
