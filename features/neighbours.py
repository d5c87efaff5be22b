"""Learned item-to-item neighbours: the table a model version ships, bound to the
serving item rows, and the per-request scores it gives the user's recent items.

``recsvc train`` learns the table from the whole training log
(``features.item2item``) and writes it beside the model; the service loads it
with the model. Each item's neighbours are one slice of flat arrays (CSR:
``indptr``, ``nbr``); each neighbour carries one score per *kind* (how it was
learned: ``related`` = co-occurrence within a user's session, ``collaborative``
= an EASE item-item model), 0 where that kind does not list it.

The table speaks its own vocabulary (the training log's item ids); a
``Binding`` maps it to the rows of one item table, whose rows only ever grow
(the serving table within one Redis epoch, the replay's table offline), so a
binding is extended for new rows instead of rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features import arrays
from features.state import ItemTable

KINDS: tuple[str, ...] = ("related", "collaborative")
# The user's newest items each score is summed over, weighted 1/rank: the
# newest alone, the current session, and the last few sessions.
WINDOWS: tuple[int, ...] = (1, 5, 10)
MAX_WINDOW = max(WINDOWS)
_WINDOW_ENDS = np.asarray(WINDOWS)
FORMAT = 2
_IDS, _PTR, _NBR, _SCORE = "item_ids.txt", "indptr.npy", "neighbours.npy", "scores.npy"
_USERS = "users.npy"
_META = "meta.json"


@dataclass(frozen=True, slots=True)
class NeighbourTable:
    """Neighbours per vocabulary item ``v``: ``nbr[indptr[v]:indptr[v + 1]]`` (int32
    vocabulary rows) with ``score`` rows (float32, one column per kind); and each
    item's distinct users in the training log (``users``, float32)."""

    ids: list[str]
    indptr: np.ndarray
    nbr: np.ndarray
    score: np.ndarray
    users: np.ndarray
    kinds: tuple[str, ...] = KINDS
    info: dict[str, object] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False, compare=False)
    # Each vocabulary item's number of neighbours (np.diff(indptr)).
    lengths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {item: v for v, item in enumerate(self.ids)})
        object.__setattr__(self, "lengths", np.diff(self.indptr))
        v, e = len(self.ids), len(self.nbr)
        if self.users.shape != (v,):
            raise ValueError(f"{self.users.shape} user counts for {v} ids")
        if self.indptr.shape != (v + 1,) or self.score.shape != (e, len(self.kinds)):
            raise ValueError(
                f"neighbour arrays {self.indptr.shape}/{self.nbr.shape}/{self.score.shape} "
                f"for {v} ids and kinds {self.kinds}"
            )
        if v and (int(self.indptr[0]) != 0 or int(self.indptr[-1]) != e):
            raise ValueError("neighbour row pointers do not cover the neighbours")

    def neighbours_of(self, item: str) -> dict[str, tuple[float, ...]]:
        """An item's neighbours and their scores per kind (for people and tests)."""
        v = self.index.get(item)
        if v is None:
            return {}
        lo, hi = int(self.indptr[v]), int(self.indptr[v + 1])
        return {
            self.ids[int(o)]: tuple(float(x) for x in row)
            for o, row in zip(self.nbr[lo:hi], self.score[lo:hi], strict=True)
        }

    def nbytes(self) -> int:
        ids = sum(len(i) + 1 for i in self.ids)
        arrays = (self.indptr, self.nbr, self.score, self.users)
        return int(sum(a.nbytes for a in arrays) + ids)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _IDS).write_text("".join(f"{i}\n" for i in self.ids))
        np.save(directory / _PTR, np.ascontiguousarray(self.indptr, dtype=np.int64))
        np.save(directory / _NBR, np.ascontiguousarray(self.nbr, dtype=np.int32))
        np.save(directory / _USERS, np.ascontiguousarray(self.users, dtype=np.float32))
        np.save(directory / _SCORE, np.ascontiguousarray(self.score, dtype=np.float32))
        meta = {"format": FORMAT, "kinds": list(self.kinds), "info": self.info}
        (directory / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> NeighbourTable:
        """Read a saved table; the arrays are memory-mapped, so the workers of one
        host share their pages. ValueError when it is not a table of this format."""
        meta = json.loads((directory / _META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: neighbour table format {meta!r:.80}, expected {FORMAT}")
        kinds_raw, info = meta.get("kinds"), meta.get("info", {})
        if not isinstance(kinds_raw, list) or not all(isinstance(k, str) for k in kinds_raw):
            raise ValueError(f"{directory}: neighbour kinds {kinds_raw!r:.80} are not names")
        if not isinstance(info, dict):
            raise ValueError(f"{directory}: neighbour info is not an object")
        ids = (directory / _IDS).read_text().split("\n")[:-1]
        indptr = np.load(directory / _PTR, allow_pickle=False)
        nbr = np.load(directory / _NBR, mmap_mode="r", allow_pickle=False)
        score = np.load(directory / _SCORE, mmap_mode="r", allow_pickle=False)
        users = np.load(directory / _USERS, allow_pickle=False)
        types = (indptr.dtype, nbr.dtype, score.dtype, users.dtype)
        if types != (np.int64, np.int32, np.float32, np.float32):
            raise ValueError(f"{directory}: neighbour arrays of the wrong type {types}")
        if np.any(np.diff(indptr) < 0):
            raise ValueError(f"{directory}: neighbour row pointers go backwards")
        if len(nbr) and (int(nbr.max()) >= len(ids) or int(nbr.min()) < 0):
            raise ValueError(f"{directory}: neighbour rows outside the vocabulary")
        if not (np.isfinite(score).all() and np.isfinite(users).all()):
            raise ValueError(f"{directory}: neighbour scores or user counts are not finite")
        # Plain read-only arrays over the maps: np.memmap's indexing costs tens of
        # microseconds a request in subclass bookkeeping.
        table = cls(ids, indptr, np.asarray(nbr), np.asarray(score), users, tuple(kinds_raw), info)
        if len(table.index) != len(ids):
            raise ValueError(f"{directory}: the neighbour vocabulary repeats ids")
        return table

    def bind(self, table: ItemTable, previous: Binding | None = None) -> Binding:
        """The mapping to ``table``'s rows. ``previous`` (bound to an earlier state of
        the same table, whose items are only ever added) is extended by the rows
        added since (``table.added``), not rebuilt."""
        if previous is not None and (previous.table_n, previous.count) == (table.n, table.count):
            return previous  # nothing new: bindings are immutable, share it
        extend = (
            previous is not None and previous.table_n <= table.n and previous.count <= table.count
        )
        first = previous.count if previous is not None and extend else 0
        # The added rows first, then the row count: a serving table may be
        # extended by another thread meanwhile, and lists a row once it is placed.
        new_rows = np.array(table.added[first:], dtype=np.int64)
        count, n = first + len(new_rows), table.n
        vocab_at = np.full(n + 1, -1, np.int64)
        log_users = np.full(n + 1, np.nan)
        if previous is not None and extend:
            old = previous.table_n
            vocab_at[:old] = previous.vocab_of
            log_users[:old] = previous.log_users[:old]
            row_of = previous.row_of.copy()
        else:
            row_of = np.full(len(self.ids), -1, np.int64)
        if len(new_rows):
            index, ids = self.index, table.ids
            vocab = np.fromiter(
                (index.get(ids[r], -1) for r in new_rows.tolist()), np.int64, len(new_rows)
            )
            vocab_at[new_rows] = vocab
            known = vocab >= 0
            row_of[vocab[known]] = new_rows[known]
            log_users[new_rows] = np.log1p(self._users_of_vocab(vocab))
        return Binding(vocab_at[:-1], row_of, n, vocab_at, log_users, count)

    def _users_of_vocab(self, vocab: np.ndarray) -> np.ndarray:
        """Training-log users of vocabulary rows (float64; NaN where -1)."""
        out = np.full(len(vocab), np.nan)
        known = vocab >= 0
        out[known] = self.users[vocab[known]]
        return out


@dataclass(frozen=True, slots=True)
class Binding:
    """A table's vocabulary against one item table's first ``table_n`` rows."""

    vocab_of: np.ndarray  # (table_n,) table row -> vocabulary row, -1 unknown
    row_of: np.ndarray  # (V,) vocabulary row -> table row, -1 not in the table
    table_n: int
    # Read at ``np.minimum(rows, table_n)`` (rows >= -1): the last slot answers -1
    # and rows past the binding. vocab_of with a -1 slot, and log1p of each
    # row's training-log users (NaN: not in the log, and the last slot).
    vocab_at: np.ndarray  # (table_n + 1,)
    log_users: np.ndarray  # (table_n + 1,)
    # How many of the table's items (``ItemTable.added``) it has bound.
    count: int = 0


@dataclass(frozen=True, slots=True)
class Bound:
    """A table with its binding: what candidate generation and features read."""

    table: NeighbourTable
    binding: Binding

    def users_of(self, rows: np.ndarray) -> np.ndarray:
        """Training-log users of items given as table rows (NaN: not in the log)."""
        b = self.binding
        vocab = np.full(len(rows), -1, np.int64)
        inside = rows < b.table_n
        vocab[inside] = b.vocab_of[rows[inside]]
        known = vocab >= 0
        out = np.full(len(rows), np.nan)
        out[known] = self.table.users[vocab[known]]
        return out

    def log_users_of(self, rows: np.ndarray) -> np.ndarray:
        """``np.log1p(users_of(rows))`` for rows >= 0, read from the binding."""
        b = self.binding
        return np.asarray(b.log_users[np.minimum(rows, b.table_n)])


@dataclass(frozen=True, slots=True)
class Affinity:
    """Summed neighbour scores of the user's recent items: for every item any of
    them lists (``items``, table rows, sorted), one column per (kind, window)."""

    items: np.ndarray
    values: np.ndarray  # (len(items), len(kinds) * len(WINDOWS))
    kinds: tuple[str, ...]
    # ``values`` with a row of zeros after the last (``values`` may be a view of
    # it): a gather at -1 reads "not listed".
    extended: np.ndarray | None = field(default=None, repr=False, compare=False)

    def padded(self) -> np.ndarray:
        """``values`` and a last row of zeros."""
        if self.extended is not None:
            return self.extended
        return np.concatenate([self.values, np.zeros((1, self.values.shape[1]))])

    def column(self, kind: str, window: int) -> int:
        return self.kinds.index(kind) * len(WINDOWS) + WINDOWS.index(window)

    def ranked(self, kind: str, window: int, limit: int | None = None) -> np.ndarray:
        """Items with a positive score of (kind, window), best first (ties: lower
        row), at most ``limit`` of them."""
        if kind not in self.kinds:
            return self.items[:0]
        if limit is not None and limit <= 0:
            return self.items[:0]
        v = self.values[:, self.column(kind, window)]
        keep = (v > 0).nonzero()[0]
        if limit is not None and len(keep) > limit:
            # Only the best ``limit`` (and everything tied with the last) are sorted.
            floor = np.partition(v[keep], len(keep) - limit)[len(keep) - limit]
            keep = keep[v[keep] >= floor]
        return self.items[keep[np.argsort(-v[keep], kind="stable")]][:limit]

    def lookup(self, candidates: np.ndarray, size: int | None = None) -> np.ndarray:
        """(len(candidates), columns): each candidate's scores, 0 where not listed
        (``size``: the item table's rows, for a dense map on small catalogues)."""
        out = np.zeros((len(candidates), self.values.shape[1]))
        if size is not None and size <= arrays.INDEX_DENSE_FACTOR * (
            len(candidates) + len(self.items)
        ):
            # Items are rows of a binding no larger than the table (< size).
            at = arrays.position_map(self.items, size)[np.minimum(candidates, size)]
        else:
            at = arrays.index_of(self.items, candidates)
        hit = at >= 0
        out[hit] = self.values[at[hit]]
        return out


def affinity(bound: Bound, recent: np.ndarray) -> Affinity:
    """Scores from the user's ``recent`` items (table rows, newest first; -1 for
    items the table does not know, which still take their place in the order)."""
    nt, b = bound.table, bound.binding
    n_kinds = len(nt.kinds)
    n_cols = n_kinds * len(WINDOWS)
    vocab = b.vocab_at[np.minimum(recent[:MAX_WINDOW], b.table_n)]
    pos = (vocab >= 0).nonzero()[0]
    if not len(pos):
        return Affinity(np.zeros(0, np.int64), np.zeros((0, n_cols)), nt.kinds)
    vocab = vocab[pos]
    # The neighbour slices of these items, gathered without a loop; entries stay
    # in the order of their owner's position, newest first.
    lengths = nt.lengths[vocab]
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    flat = np.repeat(nt.indptr[vocab] - ends + lengths, lengths)
    flat += np.arange(total)
    owner = np.repeat(pos, lengths)
    rows = b.row_of[nt.nbr[flat]]
    valid = rows >= 0
    if not valid.all():
        flat, rows, owner = flat[valid], rows[valid], owner[valid]
    if not len(rows):
        return Affinity(np.zeros(0, np.int64), np.zeros((0, n_cols)), nt.kinds)
    # Group by item (each entry's group number), then one bincount over the
    # (kind, window) segments, keyed group * n_cols + column: a window's entries
    # are a prefix (owners ascend), and each sum adds its entries in entry
    # order, as a bincount per column over that prefix would.
    items, group = arrays.group(rows, b.table_n)
    # (kinds, entries), each kind's weighted scores contiguous. np.take: indexing
    # the (entries, kinds) float32 rows with [flat] takes ~6x as long.
    weighted = np.empty((n_kinds, len(flat)))
    np.multiply(np.take(nt.score, flat, axis=0).T, 1.0 / (owner + 1.0), out=weighted)
    ends_at = np.searchsorted(owner, _WINDOW_ENDS).tolist()
    keyed = group * n_cols
    segments = [
        (k * len(WINDOWS) + w, k, end) for k in range(n_kinds) for w, end in enumerate(ends_at)
    ]
    extended = np.bincount(
        np.concatenate([keyed[:end] + col for col, _, end in segments]),
        weights=np.concatenate([weighted[k, :end] for _, k, end in segments]),
        minlength=(len(items) + 1) * n_cols,  # and a row of zeros
    ).reshape(len(items) + 1, n_cols)
    return Affinity(items, extended[:-1], nt.kinds, extended)
