"""Candidate generation from user state and item-side data (pure, shared offline/online).

``retrieve`` runs every source the configuration names and keeps each one's
ranked list (features read a candidate's rank in each); ``assemble`` takes
them in source order, each up to its quota, keeps an item once (from the first
source that proposed it), drops banned items and caps the set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from features import arrays, covisit
from features.neighbours import Affinity, Bound, affinity
from features.popularity import PopularityIndex
from features.state import ItemTable, UserState

SOURCES: tuple[str, ...] = (
    "request",
    "recent",
    "history",
    "collaborative",
    "related",
    "covisit",
    "category",
    "popular",
    "popular_month",
)
(
    SOURCE_REQUEST,
    SOURCE_RECENT,
    SOURCE_HISTORY,
    SOURCE_COLLABORATIVE,
    SOURCE_RELATED,
    SOURCE_COVISIT,
    SOURCE_CATEGORY,
    SOURCE_POPULAR,
    SOURCE_POPULAR_MONTH,
) = range(len(SOURCES))
GENERATED: tuple[str, ...] = SOURCES[1:]
# The learned sources rank by the sum over the user's last 10 items (weighted
# 1/rank, so the newest lead). The last 20 found the next item slightly more
# often (MovieLens candidate recall 0.318 vs 0.314) but served no better NDCG
# (0.0406 vs 0.0411; demo 0.4671 vs 0.4691).
RELATED_WINDOW = 10
COLLABORATIVE_WINDOW = 10
# Co-visitation (live) reads the neighbours of the user's newest items only.
COVISIT_RECENT = 20
# Rank features see each source's list to this depth; deeper is "not listed".
RANK_DEPTH = 200


@dataclass(frozen=True, slots=True)
class CandidateConfig:
    """How many candidates each source proposes, the cap, and what is banned."""

    cap: int = 200
    recent: int = 20
    # Items remembered beyond the newest ``recent`` (up to RECENT_MAX in all).
    history: int = 80
    collaborative: int = 80
    related: int = 80
    covisit: int = 60
    top_categories: int = 3
    per_category: int = 30
    popular: int = 60
    popular_month: int = 60
    # Which generated sources run (an A/B variant may pick a subset).
    sources: tuple[str, ...] = GENERATED
    # Never propose what the user already touched (a catalogue of things one
    # consumes once, like films); purchases are banned either way.
    exclude_seen: bool = False


@dataclass(frozen=True, slots=True)
class Candidates:
    """Item indices to score and the source (index into SOURCES) that proposed each."""

    index: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True, slots=True)
class Ranked:
    """One source's proposals, best first, with the rank features read (0-based;
    the category source ranks within each category). A list holds an item at
    most once: ``Retrieval.ranks`` and ``assemble`` rely on it."""

    items: np.ndarray
    rank: np.ndarray

    @classmethod
    def of(cls, items: np.ndarray) -> Ranked:
        n = len(items)
        return cls(items, _RANKS[:n] if n <= len(_RANKS) else np.arange(n, dtype=np.float64))


# Ranks 0, 1, 2, ... as read-only views: most lists are shorter than this.
_RANKS = np.arange(4 * RANK_DEPTH, dtype=np.float64)
_RANKS.flags.writeable = False


@dataclass(frozen=True, slots=True)
class Retrieval:
    """What the sources found for one user at one time, before bans and the cap."""

    recent: np.ndarray  # the user's remembered items as table rows, newest first; -1 unknown
    recent_ts: np.ndarray
    lists: dict[int, Ranked]
    affinity: Affinity | None
    banned: np.ndarray
    learned: Bound | None = None
    # Co-visitation slots of the user's newest COVISIT_RECENT known items,
    # decayed to ``now``.
    covisit_slots: covisit.Slots | None = None
    now: float | None = None
    # The item table's rows when retrieved (every item above is below it).
    size: int | None = None

    def ranks(
        self,
        candidates: np.ndarray,
        sources: tuple[int, ...],
        size: int | None = None,
        match: arrays.CandidateMatch | None = None,
    ) -> np.ndarray:
        """(len(candidates), len(sources)): each candidate's rank in each source's
        list down to RANK_DEPTH, NaN where it is not there; repeated candidates
        get the same ranks. Each list holds an item at most once. ``size``: the
        item table's rows (lets small catalogues use dense maps); ``match``: the
        candidates' ``arrays.match`` when already built."""
        if not len(candidates):
            return np.full((0, len(sources)), np.nan)
        if match is None:
            depth = sum(min(len(r.items), RANK_DEPTH) for r in self.lists.values())
            match = arrays.match(candidates, size, depth)
        return np.ascontiguousarray(self.rank_table(sources, match)[:, match.rows].T)

    def rank_table(self, sources: tuple[int, ...], match: arrays.CandidateMatch) -> np.ndarray:
        """(len(sources), match.n_rows): ``ranks`` by source and candidate row."""
        table = np.full((len(sources), match.n_rows), np.nan)
        items, ranks, offsets, lengths = [], [], [], []
        for j, s in enumerate(sources):
            listed = self.lists.get(s)
            if listed is not None and len(listed.items):
                items.append(listed.items[:RANK_DEPTH])
                ranks.append(listed.rank[:RANK_DEPTH])
                offsets.append(j * match.n_rows)
                lengths.append(len(items[-1]))
        if not items:
            return table
        at = match.at(np.concatenate(items))
        hit = (at >= 0).nonzero()[0]
        # Flat positions in the table: source j's row starts at j * n_rows.
        at += np.repeat(np.asarray(offsets, dtype=np.int64), lengths)
        table.ravel()[at[hit]] = np.concatenate(ranks)[hit]  # each (item, source) once
        return table


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


def recent_rows(user: UserState, table: ItemTable) -> tuple[np.ndarray, np.ndarray]:
    """The user's remembered items as table rows (-1 unknown) and times, newest first."""
    ordered = user.recent_newest_first()
    if not ordered:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    ids, times = zip(*ordered, strict=True)
    rows = np.fromiter(map(table.index.get, ids, repeat(-1)), np.int64, len(ids))
    return rows, np.asarray(times, dtype=np.float64)


def banned(
    user: UserState,
    table: ItemTable,
    exclude: np.ndarray,
    recent: np.ndarray,
    config: CandidateConfig,
) -> np.ndarray:
    """What may not be proposed: the request's exclusions, purchases, and (when the
    configuration says so) everything the user touched."""
    parts = [exclude]
    if user.purchased:
        parts.append(ids_to_index(table, user.purchased))
    if config.exclude_seen:
        parts.append(recent[recent >= 0])
    return np.concatenate(parts) if len(parts) > 1 else exclude


def retrieve(
    user: UserState,
    table: ItemTable,
    popularity: PopularityIndex,
    config: CandidateConfig,
    exclude: np.ndarray,
    now: float,
    learned: Bound | None = None,
) -> Retrieval:
    """Run the configured sources for ``user`` at ``now``."""
    use = config.sources
    recent, recent_ts = recent_rows(user, table)
    known = recent[recent >= 0]
    ban = banned(user, table, exclude, recent, config)
    # No source list goes deeper than the cap plus the bans (nothing below can be
    # proposed) or RANK_DEPTH (rank features read only that far, whatever the
    # request's cap and exclusions, so offline and online agree).
    depth = max(RANK_DEPTH, config.cap + len(ban))
    lists: dict[int, Ranked] = {}
    if "recent" in use:
        lists[SOURCE_RECENT] = Ranked.of(known[: config.recent])
    if "history" in use:
        lists[SOURCE_HISTORY] = Ranked.of(known[config.recent : config.recent + config.history])
    scores = affinity(learned, recent) if learned is not None and len(known) else None
    if scores is not None:
        if "collaborative" in use:
            best = scores.ranked("collaborative", COLLABORATIVE_WINDOW, depth)
            lists[SOURCE_COLLABORATIVE] = Ranked.of(best)
        if "related" in use:
            lists[SOURCE_RELATED] = Ranked.of(scores.ranked("related", RELATED_WINDOW, depth))
    slots = covisit.neighbours(table, known[:COVISIT_RECENT], now) if len(known) else None
    if "covisit" in use and config.covisit and slots is not None:
        found = covisit.aggregate(table, known[:COVISIT_RECENT], now, slots)[0]
        lists[SOURCE_COVISIT] = Ranked.of(found[:depth])
    if "category" in use:
        parts = [
            popularity.for_category(c) for c in top_categories(user, table, config.top_categories)
        ]
        parts = [p[: config.per_category] for p in parts]
        if parts:
            lists[SOURCE_CATEGORY] = Ranked(
                np.concatenate(parts),
                np.concatenate([np.arange(len(p), dtype=np.float64) for p in parts]),
            )
    if "popular" in use:
        lists[SOURCE_POPULAR] = Ranked.of(popularity.top[:depth])
    if "popular_month" in use:
        lists[SOURCE_POPULAR_MONTH] = Ranked.of(popularity.month_top[:depth])
    return Retrieval(recent, recent_ts, lists, scores, ban, learned, slots, now, table.n)


# The quota field of each source that has one (category: top_categories x per_category).
_QUOTA = {
    SOURCE_RECENT: "recent",
    SOURCE_HISTORY: "history",
    SOURCE_COLLABORATIVE: "collaborative",
    SOURCE_RELATED: "related",
    SOURCE_COVISIT: "covisit",
    SOURCE_POPULAR: "popular",
    SOURCE_POPULAR_MONTH: "popular_month",
}


CANDIDATE_QUOTAS: tuple[str, ...] = tuple(_QUOTA.values())


def quota(config: CandidateConfig, source: int) -> int:
    """How many of a source's list go into the candidates (category lists are
    already cut per category)."""
    name = _QUOTA.get(source)
    return int(getattr(config, name)) if name is not None else 1 << 30


@functools.lru_cache(maxsize=64)
def _quotas(config: CandidateConfig) -> np.ndarray:
    """Every source's quota as an array (one per configuration, cached)."""
    out = np.asarray([quota(config, s) for s in range(len(SOURCES))], dtype=np.int64)
    out.flags.writeable = False
    return out


def assemble(retrieval: Retrieval, config: CandidateConfig) -> Candidates:
    """Each source's best allowed items in SOURCES order, up to its quota (a quota
    counts items that may be proposed); deduplicated and capped."""
    present = [s for s in range(len(SOURCES)) if s in retrieval.lists]
    if not present:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int8))
    quotas = _quotas(config)
    # Past its quota plus the number of bans no item of a list can be taken.
    reach = quotas + len(retrieval.banned)
    lists = [retrieval.lists[s].items[: reach[s]] for s in present]
    items = np.concatenate(lists).astype(np.int64, copy=False)
    source = np.repeat(np.asarray(present, dtype=np.int8), [len(x) for x in lists])
    if not len(retrieval.banned) or not len(items):
        # Nothing banned: each list was cut at its quota above.
        return _dedupe(items, source, config.cap, retrieval.size)
    allowed = ~arrays.member(items, retrieval.banned, retrieval.size)
    items, source = items[allowed], source[allowed]
    # Position of each allowed item within its source's list, against the quota.
    counts = np.bincount(source, minlength=len(SOURCES))
    starts = np.cumsum(counts) - counts
    position = np.arange(len(items)) - starts[source]
    keep = position < quotas[source]
    return _dedupe(items[keep], source[keep], config.cap, retrieval.size)


def _dedupe(idx: np.ndarray, src: np.ndarray, cap: int, size: int | None = None) -> Candidates:
    """Each item once, from the first source that proposed it; capped (``size``:
    the item table's rows, every item below it)."""
    keep = arrays.first_positions(idx, size)[:cap]
    return Candidates(idx[keep], src[keep])


def from_sources(
    user: UserState,
    table: ItemTable,
    popularity: PopularityIndex,
    config: CandidateConfig,
    exclude: np.ndarray,
    now: float,
    learned: Bound | None = None,
) -> Candidates:
    """The candidates the service would score for ``user`` at ``now``."""
    return assemble(retrieve(user, table, popularity, config, exclude, now, learned), config)


def from_request(
    retrieval: Retrieval, table: ItemTable, item_ids: list[str], cap: int
) -> Candidates:
    """The caller's own candidate list (known items only), minus the banned ones."""
    idx = ids_to_index(table, item_ids)
    if len(retrieval.banned) and len(idx):
        idx = idx[~np.isin(idx, retrieval.banned)]
    return _dedupe(idx, np.full(len(idx), SOURCE_REQUEST, dtype=np.int8), cap, table.n)
