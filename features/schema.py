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

from features import arrays, covisit
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
    N_COUNTERS,
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

_NAN = np.nan

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
    # arrays.match(candidates, items.n), built once for the families that read it.
    matched: arrays.CandidateMatch | None = None

    @property
    def decayed_rows(self) -> np.ndarray:
        return self.decayed if self.decayed is not None else decay_rows(self.item_rows, self.now)

    @property
    def match(self) -> arrays.CandidateMatch:
        """Which candidate an item is (for values per candidate from item lists)."""
        if self.matched is not None:
            return self.matched
        return arrays.match(self.candidates, self.items.n)

    @property
    def item_rows(self) -> np.ndarray:
        return self.rows if self.rows is not None else self.items.raw[self.candidates]


@dataclass(frozen=True, slots=True)
class Family:
    """A block of features: names, the state they read, and the pure function.

    ``fill``, where given, writes the block (what ``compute`` returns) straight
    into the matrix's columns for it, of any float dtype: every value is computed
    in float64 and rounded once, on the write."""

    names: tuple[str, ...]
    reads: str
    compute: Callable[[FeatureInput], np.ndarray]
    fill: Callable[[FeatureInput, np.ndarray], None] | None = None


def _filled(
    fill: Callable[[FeatureInput, np.ndarray], None], width: int
) -> Callable[[FeatureInput], np.ndarray]:
    """``compute`` for a family given by its ``fill``: into a new float64 block."""

    def compute(x: FeatureInput) -> np.ndarray:
        out = np.empty((len(x.candidates), width))
        fill(x, out)
        return out

    return compute


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


def _item_popularity(x: FeatureInput, out: np.ndarray) -> None:
    rows = x.item_rows
    counts = x.decayed_rows
    price = rows[:, COL_PRICE]
    first = rows[:, COL_FIRST_SEEN]
    out[:, :N_COUNTERS] = counts.reshape(len(rows), -1)
    out[:, N_COUNTERS] = _rate(counts[:, 3, _WEEK], counts[:, 0, _WEEK], CVR_PRIOR, CVR_STRENGTH)
    out[:, N_COUNTERS + 1] = np.where(price > 0, price, _NAN)
    out[:, N_COUNTERS + 2] = np.where(first > 0, x.now - first, _NAN)


def _user_item(x: FeatureInput, out: np.ndarray) -> None:
    u, items, cand = x.user, x.items, x.candidates
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
    out[:, 0] = aff
    if total > 0:
        out[:, 1] = aff / total
    else:
        out[:, 1] = _NAN
    price = rows[:, COL_PRICE]
    mean_price = u.price_sum / u.price_n if u.price_n else np.nan
    # log(price) - log(mean) rather than log(price / mean): no warning and a
    # finite value even for a subnormal price; NaN without a price or a mean.
    if mean_price > 0:
        priced = price > 0
        safe = np.where(priced, price, mean_price)
        out[:, 2] = np.where(priced, np.log(safe) - np.log(mean_price), _NAN)
    else:
        out[:, 2] = _NAN
    # recent position, secs since, co-visit (all, last), first-seen and popularity gaps
    out[:, 3:] = _NAN
    if not u.recent:
        return
    if x.retrieval is not None:
        r_idx, r_ts = x.retrieval.recent, x.retrieval.recent_ts
    else:
        r_idx, r_ts = recent_rows(u, items)
    match = x.match
    # Each candidate's position among the recent items (distinct rows, -1 unknown).
    at = match.at(r_idx)
    listed = (at >= 0).nonzero()[0]
    position = np.full(match.n_rows, -1, dtype=np.int64)
    position[at[listed]] = listed
    first_hit = position[match.rows]
    hit = first_hit >= 0
    out[:, 3] = np.where(hit, first_hit, _NAN)
    out[:, 4] = np.where(hit, x.now - r_ts[first_hit], _NAN)
    known = r_idx[r_idx >= 0][:COVISIT_RECENT]
    if not len(known):
        return
    r = x.retrieval
    slots = r.covisit_slots if r is not None and r.now == x.now else None
    covisit_all, covisit_last = covisit.scores_for(items, known, cand, x.now, slots, match)
    out[:, 5] = covisit_all
    out[:, 6] = covisit_last
    # How the candidate fits what the user has been touching: as new (first
    # seen) and as popular (this month) as their recent items, or not.
    own = items.raw[known]
    first_seen = own[:, COL_FIRST_SEEN]
    first_seen = first_seen[first_seen > 0]
    cand_first = rows[:, COL_FIRST_SEEN]
    if len(first_seen):
        out[:, 7] = np.where(cand_first > 0, cand_first - _median(first_seen), _NAN)
    month = x.decayed_rows[:, :, MONTH_HALF_LIFE_INDEX]
    own_month = _month_popularity(own, x.now)
    out[:, 8] = np.log1p(month @ POPULARITY_WEIGHTS) - float(own_month.sum() / len(own_month))


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
_UNRANKED = len(_PROPOSING) - len(RANKED_SOURCES)


_AFFINITY_WIDTH = len(KINDS) * len(WINDOWS)


def _retrieval(x: FeatureInput, out: np.ndarray) -> None:
    r = x.retrieval
    if r is None:
        out[:] = _NAN
        return
    cand = x.candidates
    width = _AFFINITY_WIDTH
    if r.learned is not None:
        out[:, -1] = r.learned.log_users_of(cand)
    else:
        out[:, -1] = _NAN
    match = x.match
    if r.affinity is not None:
        # Each candidate's scores (the zero row where no recent item lists it).
        aff = r.affinity
        at = match.at(aff.items)
        listed = (at >= 0).nonzero()[0]
        which = np.full(match.n_rows, -1, dtype=np.int64)
        which[at[listed]] = listed
        scores = np.take(aff.padded(), which[match.rows], axis=0)
        if aff.kinds == KINDS:
            out[:, :width] = scores
        else:
            for k, kind in enumerate(KINDS):
                block = out[:, k * len(WINDOWS) : (k + 1) * len(WINDOWS)]
                if kind in aff.kinds:
                    col = aff.column(kind, WINDOWS[0])
                    block[:] = scores[:, col : col + len(WINDOWS)]
                else:
                    block[:] = _NAN
    else:
        out[:, :width] = _NAN
    # (sources, candidate rows): the proposing sources' ranks, NaN where unlisted.
    ranks = r.rank_table(_PROPOSING, match)
    out[:, width : width + len(RANKED_SOURCES)] = ranks[_UNRANKED:, match.rows].T
    out[:, -2] = (~np.isnan(ranks)).sum(axis=0)[match.rows]


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
        compute=_filled(_item_popularity, N_COUNTERS + 3),
        fill=_item_popularity,
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
        compute=_filled(_user_item, 9),
        fill=_user_item,
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
        compute=_filled(_retrieval, _AFFINITY_WIDTH + len(RANKED_SOURCES) + 2),
        fill=_retrieval,
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
    rows = np.take(items.raw, candidates, axis=0)  # [candidates] takes ~1.5x as long
    x = FeatureInput(
        user=user,
        items=items,
        candidates=candidates,
        now=now,
        context=context,
        rows=rows,
        retrieval=retrieval,
        decayed=decay_rows(rows, now),
        matched=arrays.match(candidates, items.n) if retrieval is not None or user.recent else None,
    )
    out = np.empty((len(candidates), len(FEATURE_NAMES)), dtype=dtype)
    if not len(candidates):
        return out  # reshape(len(rows), -1) cannot infer a width from 0 rows
    col = 0
    for family in FAMILIES:
        width = len(family.names)
        if family.fill is not None:
            family.fill(x, out[:, col : col + width])
        else:
            out[:, col : col + width] = family.compute(x)
        col += width
    return flush_tiny(out)


# LightGBM splits "around zero" at +-1e-35 (its kZeroThreshold), and a compiled
# scorer compares float32 where LightGBM compares doubles: a value that small
# (a 1-hour counter 116 hours later) could go left in one and right in the
# other. Nothing that small means anything here, so it is zero.
TINY = 1e-30


def flush_tiny(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with every |value| < TINY set to 0 (in place; NaN stays)."""
    tiny = np.abs(matrix) < TINY
    # +0.0 is its own flush: leaving it out (-0.0 stays in) keeps the mask almost
    # all False, and a masked copy costs per True element (a matrix is mostly 0).
    tiny &= matrix.view(_SAME_WIDTH_INT[matrix.dtype.itemsize]) != 0
    if tiny.any():
        np.copyto(matrix, 0.0, where=tiny)
    return matrix


_SAME_WIDTH_INT = {2: np.int16, 4: np.int32, 8: np.int64}
