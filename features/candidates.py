"""Candidate generation from user state and item-side data (pure, shared offline/online)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features import covisit
from features.popularity import PopularityIndex
from features.state import ItemTable, UserState

SOURCES: tuple[str, ...] = ("request", "recent", "covisit", "category", "popular")
SOURCE_REQUEST, SOURCE_RECENT, SOURCE_COVISIT, SOURCE_CATEGORY, SOURCE_POPULAR = range(5)


@dataclass(frozen=True, slots=True)
class CandidateConfig:
    """How many candidates each source proposes."""

    cap: int = 200
    top_categories: int = 3
    per_category: int = 60
    popular: int = 100
    recent: int = 20
    covisit: int = 60
    # Which generated sources run (an A/B variant may pick a subset).
    sources: tuple[str, ...] = ("recent", "covisit", "category", "popular")


@dataclass(frozen=True, slots=True)
class Candidates:
    """Item indices to score and the source (index into SOURCES) that proposed each."""

    index: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def ids_to_index(table: ItemTable, item_ids: list[str] | set[str]) -> np.ndarray:
    """Indices of the known ids among ``item_ids`` (unknown ids are dropped)."""
    get = table.index.get
    found = [i for i in map(get, item_ids) if i is not None]
    return np.asarray(found, dtype=np.int64)


def top_categories(user: UserState, table: ItemTable, k: int) -> list[int]:
    """The user's k strongest category indices (affinities share one ref time)."""
    ranked = sorted(user.category_affinity.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [table.category_index.get(c, -1) for c, _ in ranked[:k]]
    return [c for c in out if c >= 0]


def _assemble(
    parts: list[np.ndarray], sources: list[int], banned: np.ndarray, cap: int
) -> Candidates:
    if not parts:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int8))
    idx = np.concatenate(parts).astype(np.int64, copy=False)
    src = np.concatenate(
        [np.full(len(p), s, dtype=np.int8) for p, s in zip(parts, sources, strict=True)]
    )
    # Keep each item once, from the first source that proposed it.
    _, first = np.unique(idx, return_index=True)
    keep = np.sort(first)
    idx, src = idx[keep], src[keep]
    if len(banned):
        allowed = ~np.isin(idx, banned)
        idx, src = idx[allowed], src[allowed]
    return Candidates(idx[:cap], src[:cap])


def from_sources(
    user: UserState,
    table: ItemTable,
    popularity: PopularityIndex,
    config: CandidateConfig,
    exclude: np.ndarray,
    now: float,
) -> Candidates:
    """Recent items, their co-visited neighbours, top items of the user's top
    categories, then global popular."""
    parts: list[np.ndarray] = []
    sources: list[int] = []
    use = config.sources
    recent_ids = [item for item, _ in user.recent_newest_first()[: config.recent]]
    if recent_ids and ("recent" in use or "covisit" in use):
        recent = ids_to_index(table, recent_ids)
        if "recent" in use:
            parts.append(recent)
            sources.append(SOURCE_RECENT)
        if "covisit" in use and config.covisit and len(recent):
            parts.append(covisit.aggregate(table, recent, now)[0][: config.covisit])
            sources.append(SOURCE_COVISIT)
    if "category" in use:
        for c in top_categories(user, table, config.top_categories):
            parts.append(popularity.for_category(c)[: config.per_category])
            sources.append(SOURCE_CATEGORY)
    if "popular" in use:
        parts.append(popularity.top[: config.popular])
        sources.append(SOURCE_POPULAR)
    banned = _banned(user, table, exclude)
    return _assemble(parts, sources, banned, config.cap)


def from_request(
    user: UserState, table: ItemTable, item_ids: list[str], exclude: np.ndarray, cap: int
) -> Candidates:
    """The caller's own candidate list (known items only), minus purchased and excluded."""
    idx = ids_to_index(table, item_ids)
    return _assemble([idx], [SOURCE_REQUEST], _banned(user, table, exclude), cap)


def _banned(user: UserState, table: ItemTable, exclude: np.ndarray) -> np.ndarray:
    if not user.purchased:
        return exclude
    return np.concatenate([exclude, ids_to_index(table, user.purchased)])
