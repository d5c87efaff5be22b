"""The feature set: named families, each a pure function of state already fetched.

A family computes a block of columns for (one user, many candidate items) with
numpy, never looping over candidates. Missing values are NaN (LightGBM's
missing), never an exception. ``FEATURE_NAMES`` is the model's column order and
``SCHEMA_HASH`` pins it in every model's ``meta.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from features import covisit
from features.candidates import (
    COVISIT_RECENT,
    SOURCE_CATEGORY,
    SOURCE_COLLABORATIVE,
    SOURCE_COVISIT,
    SOURCE_HISTORY,
    SOURCE_POPULAR,
    SOURCE_POPULAR_MONTH,
    SOURCE_RECENT,
    SOURCE_RELATED,
    SOURCES,
    Retrieval,
    recent_rows,
)
from features.events import (
    CATEGORY_HALF_LIFE,
    EVENT_NAMES,
    HALF_LIFE_NAMES,
    HALF_LIVES,
    N_HALF_LIVES,
)
from features.neighbours import KINDS, WINDOWS
from features.popularity import (
    MONTH_HALF_LIFE_INDEX,
    POPULARITY_WEIGHTS,
    decay_column,
    decay_rows,
)
from features.state import COL_CATEGORY, COL_FIRST_SEEN, COL_PRICE, ItemTable, UserState

SCHEMA_VERSION = 5
_HL = np.asarray(HALF_LIVES)
_COUNTER_SUFFIXES = [f"{t}_{h}" for t in EVENT_NAMES for h in HALF_LIFE_NAMES]
# Beta priors for smoothed rates: a new user or item starts at the global-ish mean.
CTR_PRIOR, CTR_STRENGTH = 0.2, 10.0
CVR_PRIOR, CVR_STRENGTH = 0.02, 20.0
_WEEK = HALF_LIFE_NAMES.index("7d")  # rates over a week: enough events, still current


# Context vocabularies: a value's position is its code; any other value is
# "other" (the next code); absent is missing (NaN).
DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "app")
PAGES: tuple[str, ...] = ("home", "product", "category", "search", "cart", "checkout")


@dataclass(frozen=True, slots=True)
class Context:
    """Where the recommendation is shown, as the frontend states it (all optional)."""

    device: str | None = None
    page: str | None = None


NO_CONTEXT = Context()


@dataclass(frozen=True, slots=True)
class FeatureInput:
    """Everything a feature may read: fetched user state, item rows, candidates, time,
    and the request's context."""

    user: UserState
    items: ItemTable
    candidates: np.ndarray
    now: float
    context: Context = NO_CONTEXT
    # The candidates' item rows, gathered once for every family.
    rows: np.ndarray | None = None
    # What the candidate sources found (None: no source ran, e.g. a bare matrix).
    retrieval: Retrieval | None = None
    # decay_rows(rows, now), computed once for the families that read it.
    decayed: np.ndarray | None = None

    @property
    def decayed_rows(self) -> np.ndarray:
        return self.decayed if self.decayed is not None else decay_rows(self.item_rows, self.now)

    @property
    def item_rows(self) -> np.ndarray:
        return self.rows if self.rows is not None else self.items.raw[self.candidates]


@dataclass(frozen=True, slots=True)
class Family:
    """A block of features: names, the state they read, and the pure function."""

    names: tuple[str, ...]
    reads: str
    compute: Callable[[FeatureInput], np.ndarray]


def _rate(num: np.ndarray | float, den: np.ndarray | float, prior: float, k: float) -> np.ndarray:
    return np.asarray((num + prior * k) / (den + k))


def _user_activity(x: FeatureInput) -> np.ndarray:
    u = x.user
    counts = np.asarray(u.counts).reshape(-1, N_HALF_LIVES)
    counts = counts * np.exp2(-max(x.now - u.ref, 0.0) / _HL)[None, :]
    views, clicks, purchases = counts[0, _WEEK], counts[1, _WEEK], counts[3, _WEEK]
    since_last = x.now - u.last_ts if u.n_events else np.nan
    since_purchase = x.now - u.last_purchase_ts if u.last_purchase_ts else np.nan
    mean_price = u.price_sum / u.price_n if u.price_n else np.nan
    return np.concatenate(
        [
            counts.ravel(),
            _rate(clicks, views, CTR_PRIOR, CTR_STRENGTH)[None],
            _rate(purchases, views, CVR_PRIOR, CVR_STRENGTH)[None],
            [
                since_last,
                since_purchase,
                mean_price,
                float(len(u.category_affinity)),
                float(u.n_events),
            ],
        ]
    )


def _item_popularity(x: FeatureInput) -> np.ndarray:
    rows = x.item_rows
    counts = x.decayed_rows
    price = rows[:, COL_PRICE]
    first = rows[:, COL_FIRST_SEEN]
    cvr = _rate(counts[:, 3, _WEEK], counts[:, 0, _WEEK], CVR_PRIOR, CVR_STRENGTH)
    return np.column_stack(
        [
            counts.reshape(len(rows), -1),
            cvr,
            np.where(price > 0, price, np.nan),
            np.where(first > 0, x.now - first, np.nan),
        ]
    )


def _user_item(x: FeatureInput) -> np.ndarray:
    u, items, cand = x.user, x.items, x.candidates
    n = len(cand)
    rows = x.item_rows
    # Affinity per category index; the extra last slot answers NO_CATEGORY (-1).
    affinity = np.zeros(len(items.categories) + 1)
    if u.category_affinity:
        decay = 2.0 ** (-max(x.now - u.ref, 0.0) / CATEGORY_HALF_LIFE)
        for c, v in u.category_affinity.items():
            ci = items.category_index.get(c)
            if ci is not None:
                affinity[ci] = v * decay
    total = affinity.sum()
    aff = affinity[rows[:, COL_CATEGORY].astype(np.int64)]
    share = aff / total if total > 0 else np.full(n, np.nan)
    price = rows[:, COL_PRICE]
    mean_price = u.price_sum / u.price_n if u.price_n else np.nan
    # log(price) - log(mean) rather than log(price / mean): no warning and a
    # finite value even for a subnormal price; NaN without a price or a mean.
    if mean_price > 0:
        safe = np.where(price > 0, price, mean_price)
        log_ratio = np.where(price > 0, np.log(safe) - np.log(mean_price), np.nan)
    else:
        log_ratio = np.full(n, np.nan)
    recent_pos = np.full(n, np.nan)
    since_item = np.full(n, np.nan)
    covisit_all = np.full(n, np.nan)
    covisit_last = np.full(n, np.nan)
    age_gap = np.full(n, np.nan)
    popularity_gap = np.full(n, np.nan)
    if u.recent:
        if x.retrieval is not None:
            r_idx, r_ts = x.retrieval.recent, x.retrieval.recent_ts
        else:
            r_idx, r_ts = recent_rows(u, items)
        match = cand[:, None] == r_idx[None, :]
        hit = match.any(axis=1)
        first_hit = match.argmax(axis=1)
        recent_pos = np.where(hit, first_hit, np.nan)
        since_item = np.where(hit, x.now - r_ts[first_hit], np.nan)
        known = r_idx[r_idx >= 0][:COVISIT_RECENT]
        if len(known):
            r = x.retrieval
            slots = r.covisit_slots if r is not None and r.now == x.now else None
            covisit_all, covisit_last = covisit.scores_for(items, known, cand, x.now, slots)
            # How the candidate fits what the user has been touching: as new (first
            # seen) and as popular (this month) as their recent items, or not.
            own = items.raw[known]
            first_seen = own[:, COL_FIRST_SEEN]
            first_seen = first_seen[first_seen > 0]
            cand_first = rows[:, COL_FIRST_SEEN]
            if len(first_seen):
                age_gap = np.where(cand_first > 0, cand_first - _median(first_seen), np.nan)
            month = x.decayed_rows[:, :, MONTH_HALF_LIFE_INDEX]
            own_month = _month_popularity(own, x.now)
            popularity_gap = np.log1p(month @ POPULARITY_WEIGHTS) - float(
                own_month.sum() / len(own_month)
            )
    return np.column_stack(
        [
            aff,
            share,
            log_ratio,
            recent_pos,
            since_item,
            covisit_all,
            covisit_last,
            age_gap,
            popularity_gap,
        ]
    )


def _median(values: np.ndarray) -> float:
    """``np.median`` of a short non-empty array, without its generic machinery."""
    ordered = np.sort(values)
    mid = len(ordered) // 2
    return float(ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2)


def _month_popularity(rows: np.ndarray, now: float) -> np.ndarray:
    """log(1 + popularity at the month's half-life) of item rows."""
    counts = decay_column(rows, now, MONTH_HALF_LIFE_INDEX)
    return np.asarray(np.log1p(counts @ POPULARITY_WEIGHTS))


def _code(value: str | None, vocabulary: tuple[str, ...]) -> float:
    if value is None:
        return np.nan
    return float(vocabulary.index(value) if value in vocabulary else len(vocabulary))


def _context(x: FeatureInput) -> np.ndarray:
    hour = float(int(x.now % 86400.0 // 3600.0))  # UTC: the user's zone is unknown
    return np.asarray(
        [hour, _code(x.context.device, DEVICES), _code(x.context.page, PAGES)], dtype=np.float64
    )


# Sources whose rank in their own list is a feature (recent items have
# ui_recent_position; the request's own list has no order to speak of).
RANKED_SOURCES: tuple[int, ...] = (
    SOURCE_COLLABORATIVE,
    SOURCE_RELATED,
    SOURCE_COVISIT,
    SOURCE_CATEGORY,
    SOURCE_POPULAR,
    SOURCE_POPULAR_MONTH,
)
_PROPOSING = (SOURCE_RECENT, SOURCE_HISTORY, *RANKED_SOURCES)


def _retrieval(x: FeatureInput) -> np.ndarray:
    n = len(x.candidates)
    r = x.retrieval
    out = np.full((n, len(KINDS) * len(WINDOWS) + len(RANKED_SOURCES) + 2), np.nan)
    if r is None:
        return out
    if r.learned is not None:
        out[:, -1] = np.log1p(r.learned.users_of(x.candidates))
    width = len(KINDS) * len(WINDOWS)
    if r.affinity is not None:
        scores = r.affinity.lookup(x.candidates, x.items.n)
        for k, kind in enumerate(KINDS):
            if kind in r.affinity.kinds:
                col = r.affinity.column(kind, WINDOWS[0])
                out[:, k * len(WINDOWS) : (k + 1) * len(WINDOWS)] = scores[
                    :, col : col + len(WINDOWS)
                ]
    ranks = r.ranks(x.candidates, _PROPOSING, x.items.n)
    out[:, width : width + len(RANKED_SOURCES)] = ranks[:, len(_PROPOSING) - len(RANKED_SOURCES) :]
    proposing = (~np.isnan(ranks)).sum(axis=1)
    out[:, -2] = proposing
    return out


FAMILIES: tuple[Family, ...] = (
    Family(
        names=(
            *(f"u_cnt_{s}" for s in _COUNTER_SUFFIXES),
            "u_ctr",
            "u_cvr",
            "u_secs_since_last_event",
            "u_secs_since_last_purchase",
            "u_mean_price",
            "u_n_categories",
            "u_n_events",
        ),
        reads="user: counters, last times, price sums, category affinity",
        compute=_user_activity,
    ),
    Family(
        names=(
            *(f"i_pop_{s}" for s in _COUNTER_SUFFIXES),
            "i_cvr",
            "i_price",
            "i_age_secs",
        ),
        reads="item: counters, price, first seen",
        compute=_item_popularity,
    ),
    Family(
        names=(
            "ui_category_affinity",
            "ui_category_share",
            "ui_log_price_ratio",
            "ui_recent_position",
            "ui_secs_since_item",
            "ui_covisit",
            "ui_covisit_last",
            "ui_first_seen_gap",
            "ui_popularity_gap",
        ),
        reads=(
            "user: category affinity, recent items, price; "
            "item: category, price, co-visitation neighbours of the recent items"
        ),
        compute=_user_item,
    ),
    Family(
        names=(
            *(f"nb_{kind}_last{w}" for kind in KINDS for w in WINDOWS),
            *(f"src_{SOURCES[s]}_rank" for s in RANKED_SOURCES),
            "src_proposed_by",
            "nb_item_users",
        ),
        reads=(
            "model: learned neighbours of the user's recent items (summed, 1/rank "
            "weights), the item's users in the training log; the candidate sources' lists"
        ),
        compute=_retrieval,
    ),
    Family(
        names=("ctx_hour_utc", "ctx_device", "ctx_page"),
        reads="request: time, context.device, context.page",
        compute=_context,
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(name for f in FAMILIES for name in f.names)
# Codes without an order: LightGBM splits them as categories.
CATEGORICAL_FEATURES: tuple[str, ...] = ("ctx_device", "ctx_page")
SCHEMA_HASH = hashlib.sha256(
    f"v{SCHEMA_VERSION}:".encode() + "\n".join(FEATURE_NAMES).encode()
).hexdigest()[:16]


def user_features(user: UserState, items: ItemTable, now: float) -> dict[str, float]:
    """The user-only features by name (what a model sees for every candidate)."""
    family = FAMILIES[0]
    x = FeatureInput(user=user, items=items, candidates=np.zeros(0, np.int64), now=now)
    return dict(zip(family.names, family.compute(x).tolist(), strict=True))


def build_matrix(
    user: UserState,
    items: ItemTable,
    candidates: np.ndarray,
    now: float,
    dtype: type[np.floating[Any]] = np.float32,
    context: Context = NO_CONTEXT,
    retrieval: Retrieval | None = None,
) -> np.ndarray:
    """Feature matrix (len(candidates), len(FEATURE_NAMES)): float32 for the ranker,
    float64 where values are compared exactly (parity tests)."""
    rows = items.raw[candidates]
    x = FeatureInput(
        user=user,
        items=items,
        candidates=candidates,
        now=now,
        context=context,
        rows=rows,
        retrieval=retrieval,
        decayed=decay_rows(rows, now),
    )
    out = np.empty((len(candidates), len(FEATURE_NAMES)), dtype=dtype)
    if not len(candidates):
        return out  # reshape(len(rows), -1) cannot infer a width from 0 rows
    col = 0
    for family in FAMILIES:
        block = family.compute(x)
        width = len(family.names)
        out[:, col : col + width] = block
        col += width
    return flush_tiny(out)


# LightGBM splits "around zero" at +-1e-35 (its kZeroThreshold), and a compiled
# scorer compares float32 where LightGBM compares doubles: a value that small
# (a 1-hour counter 116 hours later) could go left in one and right in the
# other. Nothing that small means anything here, so it is zero.
TINY = 1e-30


def flush_tiny(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with every |value| < TINY set to 0 (in place; NaN stays)."""
    np.copyto(matrix, 0.0, where=np.abs(matrix) < TINY)
    return matrix
