"""Small integer-array primitives for the request path.

``np.unique`` costs several times a stable sort on the few thousand ids a
request handles (NumPy 2.x chooses a slower general path); these do the same
with one stable ``argsort``.
"""

from __future__ import annotations

import numpy as np

# A dense pass over ``size`` slots beats sorting the keys while size is within
# these factors of the number of keys (measured on this project's machine:
# grouping 1,800 keys in 5,000 slots 19 vs 35 us, 200 keys 13 vs 9 us; looking
# up 600 queries among 200 keys in 5,000 slots 6 vs 12 us). With the distinct
# keys read as the nonzero of a bool array (3x faster than of the counts):
# grouping 400 keys in 5,000 slots 8 vs 12 us, 800 in 20,000 15 vs 18 us, 200
# in 5,000 7 vs 9 us; first positions of 800 keys in 5,000 slots 10 vs 21 us,
# 200 keys 8 vs 6 us. (Past ~100,000 slots each dense pass pays page faults.)
GROUP_DENSE_FACTOR = 16
INDEX_DENSE_FACTOR = 32


def group(keys: np.ndarray, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)``: the sorted distinct keys and each
    key's position among them. With ``size`` and few slots per key, a dense count
    replaces the sort (any integers work; negative ones take the sorted path)."""
    if size is not None and size <= GROUP_DENSE_FACTOR * len(keys) and keys.min() >= 0:
        counts = np.bincount(keys, minlength=size)  # longer if a key is >= size
        # nonzero of a bool array: np.flatnonzero(counts) takes ~3x as long.
        distinct = (counts > 0).nonzero()[0]
        slot = np.empty(len(counts), dtype=np.int64)
        slot[distinct] = np.arange(len(distinct))
        return distinct, slot[keys]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def first_positions(keys: np.ndarray, size: int | None = None) -> np.ndarray:
    """Positions of each key's first occurrence, in order of position. With
    ``size`` (keys mostly in ``[0, size)``) and few slots per key, each slot's
    smallest position by ``np.minimum.at`` replaces the sort."""
    n = len(keys)
    if size is not None and n and size <= GROUP_DENSE_FACTOR * n:
        low, high = int(keys.min()), int(keys.max())
        if low >= 0:
            iota = np.arange(n)
            first = np.full(max(size, high + 1), n, dtype=np.int64)
            np.minimum.at(first, keys, iota)
            return np.flatnonzero(first[keys] == iota)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first_mask = np.empty(len(ordered), dtype=bool)
    first_mask[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first_mask[1:])
    return np.sort(order[first_mask])


def index_of(keys: np.ndarray, queries: np.ndarray, size: int | None = None) -> np.ndarray:
    """For each query, its position in ``keys`` (distinct values), -1 where absent.
    With ``size`` (values mostly below it) and few slots per value, a dense map
    replaces the sort and binary search (negative values take the sorted path)."""
    if not len(keys) or not len(queries):
        return np.full(len(queries), -1, dtype=np.int64)
    dense = size is not None and size <= INDEX_DENSE_FACTOR * (len(keys) + len(queries))
    if dense and keys.min() >= 0 and queries.min() >= 0:
        assert size is not None
        size = max(size, int(keys.max()) + 1, int(queries.max()) + 1)
        where = np.full(size, -1, dtype=np.int64)
        where[keys] = np.arange(len(keys))
        return np.asarray(where[queries])
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    pos = np.searchsorted(ordered, queries)
    np.minimum(pos, len(ordered) - 1, out=pos)
    return np.where(ordered[pos] == queries, order[pos], -1)


def position_map(keys: np.ndarray, size: int) -> np.ndarray:
    """A map of ``size + 1`` slots: ``keys[j]`` -> j, every other slot -1 (the
    last one always). Keys must lie in ``[0, size)``; a key given twice maps to
    one of its positions. Read it with ``where[np.minimum(values, size)]`` so
    values at or past ``size`` fall on the -1 slot."""
    where = np.full(size + 1, -1, dtype=np.int64)
    where[keys] = np.arange(len(keys))
    return where


def member(values: np.ndarray, members: np.ndarray, size: int | None = None) -> np.ndarray:
    """``np.isin(values, members)``; with ``size`` (members in ``[0, size)``, values
    non-negative) and few slots per value, through a position map."""
    if size is not None and size <= INDEX_DENSE_FACTOR * (len(values) + len(members)):
        return np.asarray(position_map(members, size)[np.minimum(values, size)] >= 0)
    return np.isin(values, members)


class CandidateMatch:
    """Which candidate each item of any number of item lists is, against one set
    of candidates (item table rows below ``size``), for values per candidate.

    ``rows[c]`` is candidate c's row in ``[0, n_rows)``, shared by repeated
    candidates; ``at(items)[i]`` is the row of the candidate equal to
    ``items[i]``, -1 for none (any item, -1 included). A table filled at ``at``
    and read at ``rows`` gives every candidate its value. Built once per set of
    candidates: a position map over the table's rows when they are few per
    candidate, else the sorted distinct candidates and a binary search.
    """

    __slots__ = ("_distinct", "_size", "_where", "n_rows", "rows")

    def __init__(self, candidates: np.ndarray, size: int | None, dense: bool) -> None:
        self._size = size if size is not None else 0
        self._where: np.ndarray | None = None
        self._distinct: np.ndarray | None = None
        if dense and size is not None:
            self._where = position_map(candidates, size)
            self.rows: np.ndarray = self._where[candidates]
            self.n_rows = len(candidates)
        else:
            self._distinct, self.rows = group(candidates)
            self.n_rows = len(self._distinct)

    def at(self, items: np.ndarray) -> np.ndarray:
        if self._where is not None:
            return np.asarray(self._where[np.minimum(items, self._size)])
        distinct = self._distinct
        assert distinct is not None
        if not len(distinct) or not len(items):
            return np.full(len(items), -1, dtype=np.int64)
        pos = np.searchsorted(distinct, items)
        np.minimum(pos, len(distinct) - 1, out=pos)
        return np.where(distinct[pos] == items, pos, -1)


# One position map serves every item list matched against a request's
# candidates (ranks, learned scores, co-visit sums, recent items: some ten
# items a candidate), so it pays on larger catalogues than a single lookup;
# counted as this many items a candidate when not told.
MATCH_ITEMS_PER_CANDIDATE = 3


def match(candidates: np.ndarray, size: int | None, items: int | None = None) -> CandidateMatch:
    """A ``CandidateMatch`` for candidates that are table rows (``< size``), to
    match ``items`` items in all (None: several lists, a few thousand items). A
    position map while ``size`` is small for that much work."""
    if items is None:
        items = MATCH_ITEMS_PER_CANDIDATE * len(candidates)
    dense = size is not None and size <= INDEX_DENSE_FACTOR * (len(candidates) + items)
    return CandidateMatch(candidates, size, dense)


def match_candidates(
    candidates: np.ndarray, items: np.ndarray, size: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Which candidate each of ``items`` is, for sums or values per candidate.

    Returns ``(at, rows, n_rows)``: ``at[i]`` is the row (in ``[0, n_rows)``) of
    the candidate equal to ``items[i]``, -1 for none; ``rows[c]`` is candidate
    c's row, shared by repeated candidates, so a table filled at ``at`` and read
    at ``rows`` gives every candidate its value. Candidates are table rows
    (``< size``); with a small ``size`` a position map, else a sort and search.
    """
    m = match(candidates, size, len(items))
    return m.at(items), m.rows, m.n_rows
