"""Served-list evaluation: the lists the service would have answered at held-out
events, scored against what the user did next.

A group holds what ``features.dataset`` saw just before one held-out event:
the candidates serving would score, their feature matrix, and the lists of the
baselines. The model's list is its top n of those candidates, so the true item
counts only when retrieval found it and the ranker put it in the top n. The
baselines are served lists too (bans applied, top n). The old figure, where the
true item is put into the candidates, is kept only as ``in_set_ranking``: it
measures the ranker alone and says nothing about what users get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.candidates import SOURCE_POPULAR, SOURCES, Ranked, Retrieval
from features.metrics import rank_of, summarize, top_n

BASELINES: tuple[str, ...] = ("popular", "recent", "cooccurrence")


@dataclass(slots=True)
class EvalGroup:
    candidates: np.ndarray
    sources: np.ndarray
    matrix: np.ndarray
    positive: int
    # The true item's feature row when retrieval missed it (for the in-set figure).
    true_row: np.ndarray | None
    baselines: dict[str, np.ndarray]
    found_by: dict[str, bool]
    touched_before: bool
    # The user (a log index): events of one user are not independent draws.
    user: int = -1


@dataclass(slots=True)
class EvalSet:
    groups: list[EvalGroup] = field(default_factory=list)
    sampled: int = 0
    top_n: int = 10
    skipped_unknown_user: int = 0

    def add(self, group: EvalGroup) -> None:
        self.groups.append(group)


def served_list(found: Retrieval, ranked: Ranked | None, size: int) -> np.ndarray:
    """A list as the service would use it: banned items out, the first ``size``."""
    banned = found.banned
    items = ranked.items if ranked is not None else np.zeros(0, np.int64)
    if len(banned) and len(items):
        items = items[~np.isin(items, banned)]
    return items[:size]


def baselines(found: Retrieval, n: int) -> dict[str, np.ndarray]:
    """The default strategy as served to a known user, and two simple recommenders:
    the user's own recent items, and the items most related (co-occurring in
    sessions) to their last five; each as served (bans applied, top ``n``)."""
    recent = found.recent[found.recent >= 0]
    related = found.affinity.ranked("related", 5) if found.affinity is not None else None
    return {
        "popular": served_list(found, found.lists.get(SOURCE_POPULAR), n),
        "recent": served_list(found, Ranked.of(recent), n),
        "cooccurrence": served_list(found, Ranked.of(related) if related is not None else None, n),
    }


def list_metrics(
    lists: list[np.ndarray], positives: np.ndarray, n: int, users: np.ndarray | None = None
) -> dict[str, float]:
    """NDCG, hit rate and MRR at n of served lists (one relevant item each), with
    the standard error of the NDCG mean: over events, and (given ``users``) over
    users, which is the honest one when a few heavy users give most events."""
    if not lists:
        return {
            f"ndcg_at_{n}": 0.0,
            f"hit_at_{n}": 0.0,
            f"mrr_at_{n}": 0.0,
            "ndcg_stderr": 0.0,
            "ndcg_stderr_by_user": 0.0,
        }
    rank = np.full(len(lists), np.inf)
    for g, (items, positive) in enumerate(zip(lists, positives.tolist(), strict=True)):
        where = np.flatnonzero(items[:n] == positive)
        if len(where):
            rank[g] = where[0]
    hit = rank < n
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, rank, 0.0) + 2.0), 0.0)
    return {
        f"ndcg_at_{n}": float(gain.mean()),
        f"hit_at_{n}": float(hit.mean()),
        f"mrr_at_{n}": float(np.where(hit, 1.0 / (np.where(hit, rank, 0.0) + 1.0), 0.0).mean()),
        "ndcg_stderr": float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0,
        "ndcg_stderr_by_user": clustered_stderr(gain, users),
    }


def clustered_stderr(values: np.ndarray, clusters: np.ndarray | None) -> float:
    """Standard error of a mean whose terms are correlated within clusters (the
    sandwich estimator: the residuals summed per cluster)."""
    if clusters is None or len(values) < 2:
        return 0.0
    _, inverse = np.unique(clusters, return_inverse=True)
    k = int(inverse.max()) + 1
    if k < 2:
        return 0.0
    sums = np.bincount(inverse, weights=values - values.mean(), minlength=k)
    return float(np.sqrt(k / (k - 1) * np.sum(sums**2)) / len(values))


def _coverage(lists: list[np.ndarray], n_items: int) -> float:
    if not lists or n_items <= 0:
        return 0.0
    return len(np.unique(np.concatenate(lists))) / n_items


def evaluate(
    test: EvalSet, score: Callable[[np.ndarray], np.ndarray] | None, n_items: int
) -> dict[str, Any]:
    """The served-list report. ``score`` maps a feature matrix to scores (None:
    no model; only the baselines are reported)."""
    n = test.top_n
    groups = test.groups
    positives = np.asarray([g.positive for g in groups], dtype=np.int64)
    users = np.asarray([g.user for g in groups], dtype=np.int64)
    served: dict[str, list[np.ndarray]] = {b: [g.baselines[b] for g in groups] for b in BASELINES}
    in_set: list[float] = []
    empty = sum(1 for g in groups if not len(g.candidates))
    if score is not None and groups:
        rows = [
            g.matrix if g.true_row is None else np.vstack([g.matrix, g.true_row]) for g in groups
        ]
        sizes = [len(r) for r in rows]
        scores = np.split(score(np.concatenate(rows)), np.cumsum(sizes)[:-1])
        model = []
        for g, s in zip(groups, scores, strict=True):
            own = s[: len(g.candidates)]
            model.append(g.candidates[top_n(own, n)] if len(own) else g.candidates[:0])
            where = np.flatnonzero(g.candidates == g.positive)
            in_set.append(rank_of(s, int(where[0]) if len(where) else len(s) - 1))
        served = {"model": model} | served
    report: dict[str, Any] = {
        "groups": len(groups),
        "sampled_events": test.sampled,
        "skipped_unknown_user": test.skipped_unknown_user,
        "top_n": n,
        "candidate_recall": float(np.mean([g.positive in g.candidates for g in groups]))
        if groups
        else 0.0,
        "mean_candidates": float(np.mean([len(g.candidates) for g in groups])) if groups else 0.0,
        "recall_by_source": {
            s: float(np.mean([g.found_by.get(s, False) for g in groups])) if groups else 0.0
            for s in SOURCES[1:]
        },
        "served": {
            name: list_metrics(lists, positives, n, users) | {"coverage": _coverage(lists, n_items)}
            for name, lists in served.items()
        },
    }
    if "model" in report["served"]:
        report["served"]["model"]["no_candidates"] = empty
    touched = np.asarray([g.touched_before for g in groups], dtype=bool)
    report["by_history"] = {
        label: {"share": float(mask.mean()) if len(mask) else 0.0}
        | {
            name: list_metrics([lists[k] for k in np.flatnonzero(mask)], positives[mask], n)[
                f"ndcg_at_{n}"
            ]
            for name, lists in served.items()
        }
        for label, mask in (("touched_before", touched), ("new_to_user", ~touched))
    }
    if in_set:
        report["in_set_ranking"] = {
            "note": "the true item inserted into the candidates: the ranker alone, "
            "not what users get",
            **summarize(np.asarray(in_set)),
        }
    return report
