"""Popularity ranking over the item table: global and per category."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from features.events import HALF_LIVES, N_HALF_LIVES, N_TYPES
from features.state import COL_CATEGORY, COL_COUNTS, COL_NBR_REF, COL_REF, ItemTable

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


def scores_of(
    table: ItemTable,
    rows: np.ndarray,
    now: float,
    half_life_index: int = POPULARITY_HALF_LIFE_INDEX,
) -> np.ndarray:
    """``popularity_scores`` of some rows only."""
    return np.asarray(decay_column(table.raw[rows], now, half_life_index) @ POPULARITY_WEIGHTS)


def order_keys(raw: np.ndarray, half_life_index: int) -> np.ndarray:
    """A time-invariant ranking key per row: log2 of the weighted counts at the
    row's reference time, plus that time in half-lives. The score at any later
    ``now`` is ``2 ** (key - now / half_life)`` (all of a row's counters share
    its reference time), so ordering by the key is ordering by the score at
    every ``now``, and a row's key changes only when the row does. Events only
    ever raise it. -inf for a row with no counts."""
    start = COL_COUNTS + half_life_index
    weighted = raw[:, start:COL_NBR_REF:N_HALF_LIVES] @ POPULARITY_WEIGHTS
    with np.errstate(divide="ignore"):
        return np.asarray(np.log2(weighted) + raw[:, COL_REF] / HALF_LIVES[half_life_index])


def _best(rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` of ``rows`` with the highest keys, best first (ties: lower row)."""
    if len(rows) > k > 0:
        at = keys[rows]
        threshold = at[np.argpartition(-at, k - 1)[:k]].min()
        rows = rows[at >= threshold]  # the top k and every row tied with the k-th
    order = np.lexsort((rows, -keys[rows]))
    return rows[order[:k]]


@dataclass(frozen=True, slots=True)
class PopularityIndex:
    """Most popular item indices, overall and per category index, best first, as
    ranked at ``built_at``."""

    top: np.ndarray
    by_category: tuple[np.ndarray, ...]
    built_at: float
    # The most popular at the month's half-life.
    month_top: np.ndarray

    @classmethod
    def build(cls, table: ItemTable, now: float, top_k: int = TOP_K) -> PopularityIndex:
        """The index of ``table`` from scratch (O(rows)); a serving process keeps a
        ``PopularityRanking`` current instead."""
        return PopularityRanking(table, top_k).index(now)

    def for_category(self, category_index: int) -> np.ndarray:
        if 0 <= category_index < len(self.by_category):
            return self.by_category[category_index]
        return self.top[:0]


class PopularityRanking:
    """The popularity lists of one item table, kept current as rows change.

    ``update(table, changed)`` costs O(changed rows + TOP_K) per list touched:
    a row's ranking key (``order_keys``) does not move with time and only rises
    with events, so the new top of a list is among its old top and the rows that
    changed. A list that lost a member (a row moved to another category, or a
    key fell, which events never do) is rebuilt from all rows instead.
    Not thread-safe: one updater; the PopularityIndex it hands out is immutable.
    """

    def __init__(self, table: ItemTable, top_k: int = TOP_K) -> None:
        self.top_k = top_k
        n = table.n
        present = table.present
        self.day = np.where(present, order_keys(table.raw, POPULARITY_HALF_LIFE_INDEX), -np.inf)
        self.month = np.where(present, order_keys(table.raw, MONTH_HALF_LIFE_INDEX), -np.inf)
        self.category = np.where(present, table.category, -1)
        self.present = present.copy()
        rows = np.flatnonzero(present)
        self.top = _best(rows, self.day, top_k)
        self.month_top = _best(rows, self.month, top_k)
        n_cat = len(table.categories)
        self.by_category: list[np.ndarray] = [rows[:0]] * n_cat
        if len(rows):
            # Rows by category, best first within each: one sort for all lists.
            cats = self.category[rows]
            order = np.lexsort((rows, -self.day[rows], cats))
            ranked, ranked_cats = rows[order], cats[order]
            starts = np.searchsorted(ranked_cats, np.arange(n_cat), side="left")
            ends = np.searchsorted(ranked_cats, np.arange(n_cat), side="right")
            self.by_category = [
                ranked[s : min(e, s + top_k)] for s, e in zip(starts, ends, strict=True)
            ]
        self.n = n

    def update(self, table: ItemTable, changed: np.ndarray) -> None:
        """Take the new values of the ``changed`` rows (new items included)."""
        n = table.n
        if n > len(self.day):
            # Room for a quarter more rows: growth amortised like the table's.
            grow = max(n, len(self.day) + len(self.day) // 4) - len(self.day)
            self.day = np.concatenate([self.day, np.full(grow, -np.inf)])
            self.month = np.concatenate([self.month, np.full(grow, -np.inf)])
            self.category = np.concatenate([self.category, np.full(grow, -1, np.int64)])
            self.present = np.concatenate([self.present, np.zeros(grow, bool)])
        self.n = max(self.n, n)
        if len(self.by_category) < len(table.categories):
            self.by_category += [self.top[:0]] * (len(table.categories) - len(self.by_category))
        changed = np.unique(np.asarray(changed, np.int64))
        changed = changed[table.present[changed]]
        if not len(changed):
            return
        raw = table.raw[changed]
        day = order_keys(raw, POPULARITY_HALF_LIFE_INDEX)
        month = order_keys(raw, MONTH_HALF_LIFE_INDEX)
        category = raw[:, COL_CATEGORY].astype(np.int64)
        was = self.present[changed]
        fell_day = was & (day < self.day[changed])
        fell_month = was & (month < self.month[changed])
        old_category = np.where(was, self.category[changed], -1)
        self.day[changed], self.month[changed] = day, month
        self.category[changed] = category
        self.present[changed] = True
        rows = None  # every present row, computed once if a list needs a rebuild

        def everything() -> np.ndarray:
            nonlocal rows
            if rows is None:
                rows = np.flatnonzero(self.present)
            return rows

        self.top = self._merge(self.top, changed, fell_day, self.day, everything)
        self.month_top = self._merge(self.month_top, changed, fell_month, self.month, everything)
        left = old_category[(old_category != category) & (old_category >= 0)]
        # A list that lost a member (moved away, or a key fell) is rebuilt from
        # every row of its category; the others merge their old members with
        # their changed rows, all in one sort.
        redo = np.union1d(left, category[fell_day & (category >= 0)])
        touched = np.setdiff1d(np.unique(category[category >= 0]), redo)
        for c in redo.tolist():
            members = everything()
            self.by_category[c] = _best(members[self.category[members] == c], self.day, self.top_k)
        if not len(touched):
            return
        lists = [self.by_category[c] for c in touched.tolist()]
        mine = np.isin(category, touched)
        rows_all = np.concatenate([*lists, changed[mine]])
        cats = np.concatenate([np.repeat(touched, [len(x) for x in lists]), category[mine]])
        order = np.lexsort((rows_all, -self.day[rows_all], cats))
        rows_all, cats = rows_all[order], cats[order]
        keep = np.ones(len(rows_all), bool)  # an old member that changed: once
        keep[1:] = (rows_all[1:] != rows_all[:-1]) | (cats[1:] != cats[:-1])
        rows_all, cats = rows_all[keep], cats[keep]
        starts = np.searchsorted(cats, touched, side="left").tolist()
        ends = np.searchsorted(cats, touched, side="right").tolist()
        for c, a, b in zip(touched.tolist(), starts, ends, strict=True):
            self.by_category[c] = rows_all[a : min(b, a + self.top_k)]

    def _merge(
        self,
        current: np.ndarray,
        changed: np.ndarray,
        fell: np.ndarray,
        keys: np.ndarray,
        everything: Callable[[], np.ndarray],
    ) -> np.ndarray:
        if fell.any() and np.any(fell & np.isin(changed, current)):
            return _best(everything(), keys, self.top_k)
        return _best(np.union1d(current, changed), keys, self.top_k)

    def index(self, now: float) -> PopularityIndex:
        return PopularityIndex(
            top=self.top,
            by_category=tuple(self.by_category),
            built_at=now,
            month_top=self.month_top,
        )
