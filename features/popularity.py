"""Popularity ranking over the item table: global and per category."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.events import HALF_LIVES, N_HALF_LIVES, N_TYPES
from features.state import COL_COUNTS, COL_NBR_REF, COL_REF, ItemTable

# Popularity = weighted decayed counts at the 1-day half-life: a purchase is
# worth more than a view, but views dominate by volume. The month's ranking
# (the longest half-life) is a candidate source of its own.
POPULARITY_HALF_LIFE_INDEX = 1
MONTH_HALF_LIFE_INDEX = N_HALF_LIVES - 1
POPULARITY_WEIGHTS = np.array([1.0, 2.0, 4.0, 8.0])
# Items kept per ranking; candidates and fallbacks never need more.
TOP_K = 500


def decayed_counts(table: ItemTable, rows: np.ndarray | slice, now: float) -> np.ndarray:
    """Item counters decayed to ``now``: shape (len(rows), N_TYPES, N_HALF_LIVES)."""
    return decay_rows(table.raw[rows], now)


# Each counter's half-life, in counter order (type-major): the decay of all of
# a row's counters in one product, without broadcasting over an axis of 6.
_COUNTER_HALF_LIVES = np.tile(np.asarray(HALF_LIVES), N_TYPES)


def decay_rows(raw: np.ndarray, now: float) -> np.ndarray:
    """``decayed_counts`` for item rows already gathered."""
    dt = np.maximum(now - raw[:, COL_REF], 0.0)
    factors = np.exp2(-dt[:, None] / _COUNTER_HALF_LIVES)
    counts = raw[:, COL_COUNTS:COL_NBR_REF] * factors
    return np.asarray(counts.reshape(-1, N_TYPES, N_HALF_LIVES))


def decay_column(raw: np.ndarray, now: float, half_life_index: int) -> np.ndarray:
    """``decay_rows(raw, now)[:, :, half_life_index]`` without decaying the rest."""
    dt = np.maximum(now - raw[:, COL_REF], 0.0)
    factor = np.exp2(-dt / HALF_LIVES[half_life_index])
    start = COL_COUNTS + half_life_index
    return np.asarray(raw[:, start:COL_NBR_REF:N_HALF_LIVES] * factor[:, None])


def popularity_scores(
    table: ItemTable, now: float, half_life_index: int = POPULARITY_HALF_LIFE_INDEX
) -> np.ndarray:
    """One popularity number per item at time ``now``."""
    counts = decayed_counts(table, slice(None), now)[:, :, half_life_index]
    return np.asarray(counts @ POPULARITY_WEIGHTS)


@dataclass(frozen=True, slots=True)
class PopularityIndex:
    """Most popular item indices, overall and per category index, best first."""

    scores: np.ndarray
    top: np.ndarray
    by_category: tuple[np.ndarray, ...]
    built_at: float
    # The most popular at the month's half-life.
    month_top: np.ndarray

    @classmethod
    def build(cls, table: ItemTable, now: float, top_k: int = TOP_K) -> PopularityIndex:
        scores = popularity_scores(table, now)
        # Stable order: ties (e.g. never-seen items) keep row order. Empty rows
        # (see ItemTable) are never ranked.
        order = np.argsort(-scores, kind="stable")
        present = table.present
        order = order[present[order]]
        cats = table.category[order]
        n_cat = len(table.categories)
        by_cat_order = order[np.argsort(cats, kind="stable")]
        sorted_cats = table.category[by_cat_order]
        starts = np.searchsorted(sorted_cats, np.arange(n_cat), side="left")
        ends = np.searchsorted(sorted_cats, np.arange(n_cat), side="right")
        by_category = tuple(
            by_cat_order[s : min(e, s + top_k)] for s, e in zip(starts, ends, strict=True)
        )
        month = np.where(present, popularity_scores(table, now, MONTH_HALF_LIFE_INDEX), -np.inf)
        # Partition first: only the top_k of a large catalogue need sorting.
        k = min(top_k, len(month))
        best = np.argpartition(-month, k - 1)[:k] if 0 < k < len(month) else np.arange(len(month))
        best = np.sort(best)
        month_top = best[np.argsort(-month[best], kind="stable")]
        month_top = month_top[present[month_top]]
        return cls(
            scores=scores,
            top=order[:top_k],
            by_category=by_category,
            built_at=now,
            month_top=month_top,
        )

    def for_category(self, category_index: int) -> np.ndarray:
        if 0 <= category_index < len(self.by_category):
            return self.by_category[category_index]
        return self.top[:0]
