"""Point-in-time state without replaying the log one event at a time.

Training and evaluation need the state just before a few tens of thousands of
sampled events, not after every event. ``PointInTime`` gives it, computed
from the log's columns in numpy, for the same pure state ``features.state``
defines (``features.replay`` stays the reference; ``tests/features/
test_pointintime.py`` holds the two equal):

- **Users** (``UserSnapshots``): a user's state before event k depends only on
  that user's earlier events. For a batch of samples, their users' earlier
  events are gathered at once (the log indexed by user) and folded by
  segment sums: decayed counters and category affinities are sums of
  ``w * 2 ** -((ref - ts) / half_life)`` with ``ref`` the newest earlier event;
  recent and purchased items are the newest ``RECENT_MAX`` / ``PURCHASED_MAX``
  by (newest time, id), which is what the replay's trimming keeps whatever
  the order. Only sampled users are ever built: memory is the batch's, not
  the number of users.
  Batches are bounded in samples and in gathered events; the cost is the
  sum of the samples' histories, quadratic in one user's share of the log
  (``UserSnapshots.gathered``: ``features.dataset`` replays instead past
  ``REPLAY_FACTOR`` times the log).
- **Items** (``ItemSweep``): the item table is advanced between consecutive
  samples by whole chunks of events. Counters are running sums of
  ``2 ** ((ts - anchor) / half_life)`` over an anchor on a fixed 16-day grid,
  added one event at a time in log order, so the table never depends on where
  the sweep stopped (which events were sampled); first-seen times by a
  minimum; new items placed at the rows the replay would give them (row order
  is first-appearance order, computed once).
- **Co-visitation** (``covisit_pairs``, ``fold_neighbours``): a user's pairs
  come from the first ``COVISIT_BUCKET_ITEMS`` distinct items of each hour
  bucket, each item paired with those before it; generated for a window of the
  log aligned to bucket edges, and folded into the neighbour rows one whole
  hour at a time with the replay's own float operations, so rows below the cap
  are bit-identical to the replay's. A sample in mid-hour sees its user's rows
  with the hour so far (``ItemSweep.neighbours_view``).
- **Popularity** (``Popularity``): the lists follow the table by
  ``PopularityRanking.update`` and equal a rebuild's.

Counters and affinities are summed in another order than the replay's, so they
agree to ~1e-12 relative, not bit for bit. Co-visitation rows are exact while
an item has at most ``COVISIT_NEIGHBOURS`` neighbours. Past that, the replay
admits a new neighbour only when one co-visit outweighs the weakest kept
(arrival order decides who survives); here an hour's co-visits are summed
first and the strongest ``COVISIT_NEIGHBOURS`` of old and new are kept, ties
to the older slot, so the lists differ only among the weakest neighbours of
the busiest items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from features.events import (
    CATEGORY_HALF_LIFE,
    CATEGORY_WEIGHTS,
    COVISIT_BUCKET_ITEMS,
    COVISIT_BUCKET_SECS,
    COVISIT_HALF_LIFE,
    COVISIT_NEIGHBOURS,
    HALF_LIVES,
    N_COUNTERS,
    N_HALF_LIVES,
    PURCHASED_MAX,
    RECENT_MAX,
    EventType,
)
from features.logs import Catalogue, EventLog
from features.popularity import PopularityIndex, PopularityRanking
from features.state import (
    COL_CATEGORY,
    COL_COUNTS,
    COL_FIRST_SEEN,
    COL_NBR,
    COL_NBR_REF,
    COL_NBR_SCORE,
    COL_PRICE,
    COL_REF,
    N_SHARDS,
    ItemTable,
    UserState,
    shard_of,
)

_HALF_LIVES = np.asarray(HALF_LIVES)
# Each counter's half-life in counter order (type-major, as the item rows).
_COUNTER_HALF_LIVES = np.tile(_HALF_LIVES, N_COUNTERS // N_HALF_LIVES)
_CATEGORY_WEIGHTS = np.asarray(CATEGORY_WEIGHTS)
PURCHASE = int(EventType.PURCHASE)
# Events per co-visitation window (cut at the next bucket edge): bounds the
# pairs held at once.
WINDOW_EVENTS = 1 << 20
# The counters' running sums are anchored on this grid (seconds): the largest
# term is 2 ** (grid / shortest half-life) = 2 ** 384, far from overflow.
ANCHOR_SECS = 16 * 86400.0
# Samples whose users are folded together, and at most this many of their
# earlier events gathered at once (a batch is cut short when its users'
# histories add up to more): a user with a large share of the log has a large
# share of the samples too, each gathering that user's whole history, so a
# count of samples alone bounds nothing (~170 bytes a gathered event).
USER_BATCH = 4096
GATHER_EVENTS = 1 << 20


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ``arange(starts[s], starts[s] + lengths[s])``, and for each
    element its ``s``."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    seg = np.repeat(np.arange(len(lengths)), lengths)
    offsets = np.cumsum(lengths) - lengths
    within = np.arange(total, dtype=np.int64) - np.repeat(offsets, lengths)
    return np.repeat(np.asarray(starts, np.int64), lengths) + within, seg


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Start positions of the runs of equal values of a sorted array."""
    if not len(keys):
        return np.zeros(0, np.int64)
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    return np.concatenate([[0], change]).astype(np.int64)


def _rank_in_run(keys: np.ndarray) -> np.ndarray:
    """Each element's position within its run of equal values (sorted keys)."""
    starts = _segment_starts(keys)
    lengths = np.diff(np.append(starts, len(keys)))
    return np.asarray(np.arange(len(keys)) - np.repeat(starts, lengths))


@dataclass(frozen=True, slots=True)
class ItemLayout:
    """Where every item of a log lives in the table the replay would build, and
    its catalogue attributes (fixed: only the catalogue sets them)."""

    rows: np.ndarray  # item code -> table row
    first: np.ndarray  # item code -> index of its first event (len(log) if none)
    category: np.ndarray  # item code -> category index (-1 none)
    price: np.ndarray  # item code -> price (0 unknown)
    id_rank: np.ndarray  # item code -> rank of its id among the log's ids (str order)
    count: int  # items in the table once the whole log is in

    @classmethod
    def of(cls, log: EventLog, table: ItemTable) -> ItemLayout:
        """``table`` holds the catalogue only; the log's new items get rows in order
        of first appearance, per shard, as ``ItemTable.ensure_item`` gives them."""
        n_codes = len(log.item_ids)
        first = np.full(n_codes, len(log), np.int64)
        np.minimum.at(first, log.item, np.arange(len(log), dtype=np.int64))
        get = table.index.get
        rows = np.fromiter((get(item, -1) for item in log.item_ids), dtype=np.int64, count=n_codes)
        seen = first < len(log)
        new = np.flatnonzero(seen & (rows < 0))
        new = new[np.argsort(first[new], kind="stable")]
        shards = np.fromiter(
            (shard_of(log.item_ids[c]) for c in new.tolist()), dtype=np.int64, count=len(new)
        )
        order = np.argsort(shards, kind="stable")
        position = np.empty(len(new), np.int64)
        position[order] = table.shard_counts[shards[order]] + _rank_in_run(shards[order])
        rows[new] = position * N_SHARDS + shards
        # Catalogue items carry their attributes; new ones have none (as the
        # replay creates them bare).
        category = np.full(n_codes, -1, np.int64)
        price = np.zeros(n_codes)
        listed = np.flatnonzero((rows >= 0) & (rows < table.n))
        listed = listed[~np.isin(listed, new)]
        category[listed] = table.raw[rows[listed], COL_CATEGORY].astype(np.int64)
        price[listed] = table.raw[rows[listed], COL_PRICE]
        id_rank = np.empty(n_codes, np.int64)
        id_rank[np.argsort(np.asarray(log.item_ids, dtype=object), kind="stable")] = np.arange(
            n_codes
        )
        return cls(rows, first, category, price, id_rank, table.count + len(new))


def covisit_pairs(
    ts: np.ndarray, user: np.ndarray, rows: np.ndarray, k0: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The co-visit updates a run of events makes (all of each bucket it holds),
    in the replay's order: (event index, target row, neighbour row, pair time).

    Per (user, bucket), the first COVISIT_BUCKET_ITEMS distinct items in event
    order; each pairs with those before it, in row order, both directions
    (the item's row first, then the partner's)."""
    n = len(ts)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty, empty, np.zeros(0)
    bucket = np.floor(ts / COVISIT_BUCKET_SECS).astype(np.int64)
    order = np.lexsort((np.arange(n), bucket, user))
    g_user, g_bucket, g_row = user[order], bucket[order], rows[order]
    boundary = np.ones(n, bool)
    boundary[1:] = (g_user[1:] != g_user[:-1]) | (g_bucket[1:] != g_bucket[:-1])
    gid = np.cumsum(boundary) - 1
    # First occurrence of each (group, item), in event order within the group.
    key = gid * (int(rows.max()) + 1) + g_row
    by_key = np.lexsort((np.arange(n), key))
    first_mask = np.ones(n, bool)
    ordered_keys = key[by_key]
    first_mask[1:] = ordered_keys[1:] != ordered_keys[:-1]
    firsts = np.sort(by_key[first_mask])
    f_gid = gid[firsts]
    rank = _rank_in_run(f_gid)
    keep = rank < COVISIT_BUCKET_ITEMS
    firsts, rank = firsts[keep], rank[keep]
    later: list[np.ndarray] = []
    partner: list[np.ndarray] = []
    for d in range(1, COVISIT_BUCKET_ITEMS):
        j = np.flatnonzero(rank >= d)
        if not len(j):
            break
        later.append(firsts[j])
        partner.append(firsts[j - d])
    if not later:
        return empty, empty, empty, np.zeros(0)
    at, other = np.concatenate(later), np.concatenate(partner)
    k = order[at].astype(np.int64) + k0
    item_row, partner_row = g_row[at], g_row[other]
    t = g_bucket[at].astype(np.float64) * COVISIT_BUCKET_SECS
    # Both directions; the replay's order: event, partner row, item's row first.
    k2 = np.concatenate([k, k])
    p2 = np.concatenate([partner_row, partner_row])
    direction = np.repeat(np.asarray([0, 1], np.int64), len(k))
    target = np.concatenate([item_row, partner_row])
    neighbour = np.concatenate([partner_row, item_row])
    seq = np.lexsort((direction, p2, k2))
    return k2[seq], target[seq], neighbour[seq], np.concatenate([t, t])[seq]


class ItemSweep:
    """The item table as the replay has it just before a given event, advanced by
    chunks of events (``advance``), never backwards.

    What it holds never depends on where it was stopped (which events were
    sampled): counters are running sums of ``2 ** ((ts - anchor) / half_life)``
    added one event at a time in log order (``np.add.at``), over an anchor that
    moves on a fixed grid, and turned into the row's values at its newest event;
    co-visits are folded one hour bucket at a time. A sample in the middle of
    an hour sees that hour's earlier co-visits through ``neighbours_view``."""

    def __init__(self, log: EventLog, catalogue: Catalogue | None = None) -> None:
        table = ItemTable()
        if catalogue is not None:
            for item, cat, price in zip(
                catalogue.item_ids, catalogue.categories, catalogue.prices.tolist(), strict=True
            ):
                table.upsert_item(item, cat, price)
        self.table = table
        self.log = log
        self.layout = ItemLayout.of(log, table)
        self.pos = 0
        self._window_end = 0
        self._pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._pair_pos = 0  # pairs folded into the table (whole hours)
        self._acc = np.zeros((table.capacity, N_COUNTERS))
        self._anchor = np.zeros(table.capacity, np.int64)
        # The popularity rankings that follow the table (each keeps the rows
        # changed since it last looked).
        self._followers: list[Popularity] = []

    def follow(self, follower: Popularity) -> None:
        self._followers.append(follower)

    def advance(self, k: int) -> None:
        """Apply events ``[pos, k)``."""
        while self.pos < k:
            if self.pos >= self._window_end:
                self._next_window()
            end = min(k, self._window_end)
            self._apply(self.pos, end)
            self.pos = end
        # Co-visits of the hours before event k's are complete: fold them.
        if self._pairs is not None:
            log = self.log
            hour = (
                np.floor(log.ts[k] / COVISIT_BUCKET_SECS) * COVISIT_BUCKET_SECS
                if k < len(log)
                else np.inf
            )
            self._fold_hours(int(np.searchsorted(self._pairs[3], hour, side="left")))

    def _fold_hours(self, until: int) -> None:
        """Fold the window's pairs up to ``until`` into the rows, one hour at a time."""
        assert self._pairs is not None
        _, target, neighbour, t = self._pairs
        a = self._pair_pos
        if until <= a:
            return
        for lo, hi in _runs(t[a:until]):
            fold_neighbours(
                self.table.raw,
                target[a + lo : a + hi],
                neighbour[a + lo : a + hi],
                t[a + lo : a + hi],
            )
        self._pair_pos = until

    @contextmanager
    def neighbours_view(self, rows: np.ndarray) -> Iterator[None]:
        """Within: ``rows`` also hold the co-visits of the current hour so far (the
        hour is folded for good once it is complete)."""
        if self._pairs is None or not len(rows):
            yield
            return
        k, target, neighbour, t = self._pairs
        a, b = self._pair_pos, int(np.searchsorted(k, self.pos, side="left"))
        if b <= a:
            yield
            return
        wanted = np.zeros(self.table.n + 1, bool)
        wanted[rows[(rows >= 0) & (rows < self.table.n)]] = True
        mine = a + np.flatnonzero(wanted[target[a:b]])
        if not len(mine):
            yield
            return
        raw = self.table.raw
        touched = np.unique(target[mine])
        saved = raw[touched, COL_NBR_REF : COL_NBR_SCORE + COVISIT_NEIGHBOURS].copy()
        fold_neighbours(raw, target[mine], neighbour[mine], t[mine])
        try:
            yield
        finally:
            raw[touched, COL_NBR_REF : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = saved

    def _next_window(self) -> None:
        if self._pairs is not None:
            self._fold_hours(len(self._pairs[0]))  # a window ends at an hour's edge
        log, lo = self.log, self.pos
        hi = min(len(log), lo + WINDOW_EVENTS)
        if hi < len(log):
            # Extend to the next bucket edge: a bucket's events in one window.
            last = np.floor(log.ts[hi - 1] / COVISIT_BUCKET_SECS)
            ahead = min(len(log), hi + WINDOW_EVENTS)
            while True:
                buckets = np.floor(log.ts[hi:ahead] / COVISIT_BUCKET_SECS)
                past = np.flatnonzero(buckets > last)
                if len(past):
                    hi += int(past[0])
                    break
                hi = ahead
                if hi >= len(log):
                    break
                ahead = min(len(log), hi + WINDOW_EVENTS)
        rows = self.layout.rows[log.item[lo:hi]]
        self._pairs = covisit_pairs(log.ts[lo:hi], log.user[lo:hi], rows, lo)
        self._pair_pos = 0
        self._window_end = hi

    def _grow(self) -> None:
        cap = self.table.capacity
        if len(self._anchor) < cap:
            acc = np.zeros((cap, N_COUNTERS))
            acc[: len(self._acc)] = self._acc
            anchor = np.zeros(cap, np.int64)
            anchor[: len(self._anchor)] = self._anchor
            self._acc, self._anchor = acc, anchor

    def _apply(self, lo: int, hi: int) -> None:
        log, table, layout = self.log, self.table, self.layout
        codes = log.item[lo:hi]
        rows = layout.rows[codes]
        # New items, in order of first appearance (unless a sample placed one).
        fresh = layout.first[codes] == np.arange(lo, hi)
        if fresh.any():
            new_codes = codes[fresh]
            new_rows = rows[fresh]
            # Not yet placed (a sample may have placed its own item already).
            inside = new_rows < table.n
            absent = ~inside
            absent[inside] = ~table.present[new_rows[inside]]
            if absent.any():
                place = new_rows[absent]
                table.reserve(int(place.max()) + 1)
                table.place_many(place, [log.item_ids[c] for c in new_codes[absent].tolist()])
        self._grow()
        ts = log.ts[lo:hi]
        cell = np.floor(ts / ANCHOR_SECS).astype(np.int64)
        for a, b in _runs(cell):
            self._count(
                rows[a:b], log.type[lo + a : lo + b].astype(np.int64), ts[a:b], int(cell[a])
            )
        raw = table.raw
        touched, inv = np.unique(rows, return_inverse=True)
        for follower in self._followers:
            follower.changed(touched)
        earliest = np.full(len(touched), np.inf)
        np.minimum.at(earliest, inv, ts)
        first = raw[touched, COL_FIRST_SEEN]
        raw[touched, COL_FIRST_SEEN] = np.where(
            (first == 0.0) | (earliest < first), earliest, first
        )

    def _count(self, rows: np.ndarray, types: np.ndarray, ts: np.ndarray, cell: int) -> None:
        """Events of one anchor cell into the running sums, then the rows' values."""
        raw, acc, anchor = self.table.raw, self._acc, self._anchor
        touched = np.unique(rows)
        behind = touched[anchor[touched] < cell]
        if len(behind):  # move the anchor: sums decayed to the new one
            gap = (cell - anchor[behind]).astype(np.float64) * ANCHOR_SECS
            acc[behind] = _decayed(acc[behind], gap)
            anchor[behind] = cell
        base = cell * ANCHOR_SECS
        weights = np.exp2((ts - base)[:, None] / _HALF_LIVES)
        slot = (rows * N_COUNTERS + types * N_HALF_LIVES)[:, None] + np.arange(N_HALF_LIVES)
        np.add.at(acc.reshape(-1), slot.ravel(), weights.ravel())
        newest = np.maximum(raw[touched, COL_REF], 0.0)
        np.maximum.at(newest, np.searchsorted(touched, rows), ts)
        raw[touched, COL_REF] = newest
        raw[touched, COL_COUNTS : COL_COUNTS + N_COUNTERS] = acc[touched] * np.exp2(
            -(newest - base)[:, None] / _COUNTER_HALF_LIVES
        )


class Popularity:
    """A popularity ranking that follows a sweep's table: ``index(now)`` equals
    ``PopularityIndex.build(table, now)`` at O(changed rows + TOP_K) a call
    (``PopularityRanking.update``) instead of O(rows)."""

    def __init__(self, sweep: ItemSweep) -> None:
        self.sweep = sweep
        self.ranking: PopularityRanking | None = None
        self.count = 0  # the table's items it has seen placed
        self._pending: list[np.ndarray] = []
        self._held = 0
        sweep.follow(self)

    def changed(self, rows: np.ndarray) -> None:
        """Rows a chunk changed (kept until the next ``index``; compacted so a
        ranking asked rarely holds at most a few times the table's rows)."""
        self._pending.append(rows)
        self._held += len(rows)
        if self._held > 4 * max(self.sweep.table.n, 1 << 16):
            merged = np.unique(np.concatenate(self._pending))
            self._pending, self._held = [merged], len(merged)

    def index(self, now: float) -> PopularityIndex:
        table = self.sweep.table
        changed = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int64)
        self._pending, self._held = [], 0
        if self.ranking is None:
            self.ranking = PopularityRanking(table)
        else:
            # Rows placed since, changed or not (a sample places its own item).
            added = np.asarray(table.added[self.count :], np.int64)
            self.ranking.update(table, np.concatenate([changed, added]))
        self.count = table.count
        return self.ranking.index(now)


def _decayed(acc: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Running sums (len(gap), N_COUNTERS) decayed over ``gap`` seconds per row.

    Late in an anchor cell a 1-hour sum is near 2 ** 384, so its factor alone
    (2 ** -1152 three cells on) underflows to 0 where the product (~2 ** -800) is
    a normal float the replay keeps: whole powers of two are applied exactly
    (``ldexp``), only the fraction by a multiplication."""
    x = gap[:, None] / _COUNTER_HALF_LIVES
    whole = np.floor(x)
    shift = -np.minimum(whole, 4096.0).astype(np.int32)  # past -2100 everything is 0
    return np.asarray(np.ldexp(acc * np.exp2(whole - x), shift))


def _runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values."""
    starts = _segment_starts(keys).tolist()
    return list(zip(starts, [*starts[1:], len(keys)], strict=True))


def _pow2(x: np.ndarray) -> np.ndarray:
    """``2.0 ** x`` per element as Python (C ``pow``) computes it: numpy's SIMD
    ``exp2``/``power`` differ from it in the last bit for ~5% of arguments, and
    co-visit counts are compared for ties (hour buckets make exact ties common)."""
    return np.fromiter(map(math.pow, repeat(2.0), x.tolist()), np.float64, len(x))


def fold_neighbours(
    raw: np.ndarray, target: np.ndarray, neighbour: np.ndarray, t: np.ndarray
) -> None:
    """Add co-visits (in arrival order) to the neighbour slots of item rows.

    Below the cap this is the replay's arithmetic operation for operation: at
    each new pair time a row's counts are multiplied by the decay since its
    last, then each co-visit adds 1.0 (its weight at its own time), so sums are
    bit-identical and ties break alike. Old neighbours keep their slots, new
    ones follow in order of arrival. A row left with more than
    COVISIT_NEIGHBOURS keeps the strongest (ties: older slot, earlier arrival),
    where the replay would have let arrival order decide."""
    width = COVISIT_NEIGHBOURS
    n = len(target)
    rows, inv = np.unique(target, return_inverse=True)
    n_rows = len(rows)
    old_keys = raw[rows, COL_NBR : COL_NBR + width].astype(np.int64)
    key = neighbour.astype(np.int64) + 1
    # Each pair's slot: its neighbour's old slot, or a new one after the filled.
    in_old = old_keys[inv] == key[:, None]
    slot = np.where(in_old.any(axis=1), in_old.argmax(axis=1), -1)
    filled = (old_keys > 0).sum(axis=1)
    new = np.flatnonzero(slot < 0)
    if len(new):
        combo = inv[new] * (int(key.max()) + 1) + key[new]
        by = np.lexsort((new, combo))
        first = np.ones(len(by), bool)
        first[1:] = combo[by][1:] != combo[by][:-1]
        group = np.cumsum(first) - 1
        firsts = by[first]  # first arrival of each new (row, neighbour), by combo
        arrival = np.argsort(firsts, kind="stable")
        f_rows = inv[new[firsts[arrival]]]
        rank = np.empty(len(firsts), np.int64)
        order_by_row = np.argsort(f_rows, kind="stable")
        rank[arrival[order_by_row]] = _rank_in_run(f_rows[order_by_row])
        slot[new[by]] = filled[inv[new[by]]] + rank[group]
    extended = max(width, int(slot.max()) + 1)
    scores = np.zeros((n_rows, extended))
    scores[:, :width] = raw[rows, COL_NBR_SCORE : COL_NBR_SCORE + width]
    keys = np.zeros((n_rows, extended), np.int64)
    keys[:, :width] = old_keys
    keys[inv, slot] = key
    ref = raw[rows, COL_NBR_REF].copy()
    # The j-th distinct pair time of each row (times only rise within a row).
    step = np.zeros(n, np.int64)
    if n > 1:
        by_row = np.argsort(inv, kind="stable")
        r_sorted, t_sorted = inv[by_row], t[by_row]
        change = np.ones(n, bool)
        change[1:] = (r_sorted[1:] != r_sorted[:-1]) | (t_sorted[1:] != t_sorted[:-1])
        level = np.cumsum(change)
        level -= np.repeat(
            level[_segment_starts(r_sorted)], np.diff(np.append(_segment_starts(r_sorted), n))
        )
        step[by_row] = level
    flat = scores.reshape(-1)
    cell = inv * extended + slot
    for j in range(int(step.max()) + 1):
        at = np.flatnonzero(step == j)
        if not len(at):
            continue
        first_at = at[np.unique(inv[at], return_index=True)[1]]
        r, tj = inv[first_at], t[first_at]
        later = tj > ref[r]
        if later.any():
            r, tj = r[later], tj[later]
            scores[r] *= _pow2(-(tj - ref[r]) / COVISIT_HALF_LIFE)[:, None]
            ref[r] = tj
        # Each co-visit adds 1.0 in turn (repeats of a cell one after another).
        cells = np.sort(cell[at])
        nth = _rank_in_run(cells)
        for m in range(int(nth.max()) + 1):
            flat[cells[nth == m]] += 1.0
    count = (keys > 0).sum(axis=1)
    over = count > width
    fits = np.flatnonzero(~over)
    raw[rows[fits], COL_NBR : COL_NBR + width] = keys[fits, :width]
    raw[rows[fits], COL_NBR_SCORE : COL_NBR_SCORE + width] = scores[fits, :width]
    crowded = np.flatnonzero(over)
    if len(crowded):
        # The strongest `width`, kept in slot order (old first, then arrivals).
        sub = scores[crowded]
        order = np.argsort(-sub, axis=1, kind="stable")[:, :width]
        order.sort(axis=1)
        raw[rows[crowded], COL_NBR : COL_NBR + width] = np.take_along_axis(keys[crowded], order, 1)
        raw[rows[crowded], COL_NBR_SCORE : COL_NBR_SCORE + width] = np.take_along_axis(
            sub, order, 1
        )
    raw[rows, COL_NBR_REF] = ref


class UserSnapshots:
    """Users' states just before given events, folded from their earlier events in
    numpy (see the module docstring)."""

    def __init__(self, log: EventLog, layout: ItemLayout, categories: list[str]) -> None:
        self.log = log
        self.layout = layout
        self.categories = categories
        self.by_user = np.argsort(log.user, kind="stable")
        users = log.user[self.by_user]
        self.start = np.searchsorted(users, np.arange(len(log.user_ids) + 1)).astype(np.int64)
        # Each event's number among its user's events.
        self.nth = np.empty(len(log), np.int64)
        self.nth[self.by_user] = np.arange(len(log)) - self.start[users]
        self._ids = np.asarray(log.item_ids, dtype=object)

    def before(
        self, ks: np.ndarray, users: np.ndarray | None = None, own: np.ndarray | None = None
    ) -> tuple[list[UserState | None], np.ndarray]:
        """The state of each ``users[s]`` (default: event ``ks[s]``'s user; -1 no
        user) just before event ``ks[s]`` (None: no earlier event), and whether it
        had touched item ``own[s]`` (default: the event's item) before."""
        ks = np.asarray(ks, np.int64)
        if users is None:
            users = self.log.user[np.minimum(ks, len(self.log) - 1)].astype(np.int64)
        if own is None:
            own = self.log.item[np.minimum(ks, len(self.log) - 1)].astype(np.int64)
        users = np.asarray(users, np.int64)
        n_prior = self.prior(ks, users)
        states: list[UserState | None] = []
        touched = np.zeros(len(ks), bool)
        lo = 0
        while lo < len(ks):
            # As many samples as fit the budget of gathered events (at least one).
            gathered = np.cumsum(n_prior[lo : lo + USER_BATCH])
            hi = lo + max(1, int(np.searchsorted(gathered, GATHER_EVENTS, side="right")))
            part, seen = self._batch(ks[lo:hi], users[lo:hi], own[lo:hi], n_prior[lo:hi])
            states.extend(part)
            touched[lo:hi] = seen
            lo = hi
        return states, touched

    def gathered(self, ks: np.ndarray) -> int:
        """Earlier events of their users that states before events ``ks`` fold."""
        ks = np.asarray(ks, np.int64)
        return int(self.nth[ks[ks < len(self.log)]].sum())

    def prior(self, ks: np.ndarray, users: np.ndarray) -> np.ndarray:
        """How many of each user's events come before event k (0 for user -1)."""
        n = len(self.log)
        out = np.zeros(len(ks), np.int64)
        at = np.minimum(ks, n - 1)
        own = (ks < n) & (users >= 0) & (self.log.user[at] == users)
        out[own] = self.nth[ks[own]]
        # Not the user's own event (an impression): search the user's events.
        for s in np.flatnonzero(~own & (users >= 0)).tolist():
            lo, hi = int(self.start[users[s]]), int(self.start[users[s] + 1])
            out[s] = int(np.searchsorted(self.by_user[lo:hi], ks[s], side="left"))
        return out

    def _batch(
        self, ks: np.ndarray, users: np.ndarray, own: np.ndarray, n_prior: np.ndarray
    ) -> tuple[list[UserState | None], np.ndarray]:
        log, layout = self.log, self.layout
        n_s = len(ks)
        users = np.maximum(users, 0)
        events, seg = _ranges(self.start[users], n_prior)
        events = self.by_user[events]
        ts = log.ts[events]
        codes = log.item[events].astype(np.int64)
        types = log.type[events].astype(np.int64)
        ends = np.cumsum(n_prior)
        has = n_prior > 0
        ref = np.zeros(n_s)
        ref[has] = ts[ends[has] - 1]  # the newest earlier event (the log is in time order)
        age = ref[seg] - ts
        weights = np.exp2(-age[:, None] / _HALF_LIVES)
        slot = (seg * N_COUNTERS + types * N_HALF_LIVES)[:, None] + np.arange(N_HALF_LIVES)
        counts = np.bincount(slot.ravel(), weights.ravel(), minlength=n_s * N_COUNTERS).reshape(
            n_s, N_COUNTERS
        )
        # Category affinities, per (sample, category) in order of first event.
        cats = layout.category[codes]
        with_cat = np.flatnonzero(cats >= 0)
        c_key = seg[with_cat] * (len(self.categories) + 1) + cats[with_cat]
        c_w = _CATEGORY_WEIGHTS[types[with_cat]] * np.exp2(-age[with_cat] / CATEGORY_HALF_LIFE)
        c_by = np.lexsort((with_cat, c_key))
        c_starts = _segment_starts(c_key[c_by])
        c_total = np.add.reduceat(c_w[c_by], c_starts) if len(c_by) else c_w[:0]
        c_first = with_cat[c_by][c_starts]
        c_order = np.argsort(c_first, kind="stable")
        c_seg = seg[c_first][c_order]
        c_cat = cats[c_first][c_order]
        c_total = c_total[c_order]
        c_bounds = np.searchsorted(c_seg, np.arange(n_s + 1))
        # Prices: summed in event order (bincount adds in input order).
        price = layout.price[codes]
        priced = price > 0
        price_sum = np.bincount(seg[priced], price[priced], minlength=n_s)
        price_n = np.bincount(seg[priced], minlength=n_s)
        is_purchase = types == PURCHASE
        last_purchase = np.zeros(n_s)
        np.maximum.at(last_purchase, seg[is_purchase], ts[is_purchase])
        recent_seg, recent_codes, recent_ts = _newest_items(
            seg, codes, ts, layout.id_rank, RECENT_MAX
        )
        r_bounds = np.searchsorted(recent_seg, np.arange(n_s + 1))
        buy = np.flatnonzero(is_purchase)
        p_seg, p_codes, p_ts = _newest_items(
            seg[buy], codes[buy], ts[buy], layout.id_rank, PURCHASED_MAX
        )
        p_bounds = np.searchsorted(p_seg, np.arange(n_s + 1))
        # Whether the sample's own item is among the user's earlier items.
        touched = np.bincount(seg[codes == own[seg]], minlength=n_s) > 0
        ids, names = self._ids, self.categories
        out: list[UserState | None] = []
        counts_l: list[list[float]] = counts.astype(np.float64).tolist()
        ref_l, lp_l = ref.tolist(), last_purchase.tolist()
        ps_l, pn_l, np_l = price_sum.tolist(), price_n.tolist(), n_prior.tolist()
        c_total_l, c_cat_l = c_total.tolist(), c_cat.tolist()
        r_ids, r_ts = ids[recent_codes].tolist(), recent_ts.tolist()
        p_ids, p_ts_l = ids[p_codes].tolist(), p_ts.tolist()
        cb, rb, pb = c_bounds.tolist(), r_bounds.tolist(), p_bounds.tolist()
        for s in range(n_s):
            if not np_l[s]:
                out.append(None)
                continue
            purchase_times = dict(
                zip(p_ids[pb[s] : pb[s + 1]], p_ts_l[pb[s] : pb[s + 1]], strict=True)
            )
            out.append(
                UserState(
                    ref=ref_l[s],
                    counts=counts_l[s],
                    category_affinity={
                        names[c]: v
                        for c, v in zip(
                            c_cat_l[cb[s] : cb[s + 1]], c_total_l[cb[s] : cb[s + 1]], strict=True
                        )
                    },
                    recent=dict(
                        zip(r_ids[rb[s] : rb[s + 1]], r_ts[rb[s] : rb[s + 1]], strict=True)
                    ),
                    purchased=set(purchase_times),
                    last_ts=ref_l[s],
                    last_purchase_ts=lp_l[s],
                    price_sum=ps_l[s],
                    price_n=pn_l[s],
                    n_events=np_l[s],
                    purchase_times=purchase_times,
                )
            )
        return out, touched


def _newest_items(
    seg: np.ndarray, codes: np.ndarray, ts: np.ndarray, id_rank: np.ndarray, keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment, its distinct items' newest times, and only the ``keep`` largest
    by (time, id): (segment, item, time), by segment, newest first."""
    if not len(seg):
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    key = seg * (int(codes.max()) + 1) + codes
    by = np.lexsort((ts, key))  # within a (segment, item), the newest last
    ordered = key[by]
    last = np.ones(len(by), bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    pick = by[last]
    s, c, t = seg[pick], codes[pick], ts[pick]
    order = np.lexsort((-id_rank[c], -t, s))
    s, c, t = s[order], c[order], t[order]
    kept = _rank_in_run(s) < keep
    return s[kept], c[kept], t[kept]


class PointInTime:
    """The state just before each of a sorted list of events: the item table
    (advanced in place) and the event's user (built for it)."""

    def __init__(self, log: EventLog, catalogue: Catalogue | None = None) -> None:
        self.log = log
        self.items = ItemSweep(log, catalogue)
        self.users = UserSnapshots(log, self.items.layout, self.items.table.categories)

    @property
    def table(self) -> ItemTable:
        return self.items.table

    def view(self, user: UserState) -> AbstractContextManager[None]:
        """Within: the rows of ``user``'s recent items hold the co-visits of the
        current hour so far too (what the state before the event has; the
        table folds an hour for good once it is complete)."""
        if not user.recent:
            return nullcontext()
        get = self.table.index.get
        rows = np.fromiter((get(i, -1) for i in user.recent), np.int64, len(user.recent))
        return self.items.neighbours_view(rows)

    def before_each(
        self,
        ks: np.ndarray,
        users: np.ndarray | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, UserState | None, bool]]:
        """For each event index of ``ks`` (ascending; ``len(log)`` = after the
        last): (k, the state of event k's user or of ``users[s]`` (a log user
        code, -1 none), whether that user touched event k's item before), with
        ``table`` just before event k."""
        ks = np.asarray(ks, np.int64)
        for lo in range(0, len(ks), USER_BATCH):
            part = ks[lo : lo + USER_BATCH]
            who = None if users is None else np.asarray(users[lo : lo + USER_BATCH], np.int64)
            states, touched = self.users.before(part, who)
            for k, state, seen in zip(part.tolist(), states, touched.tolist(), strict=True):
                if progress is not None and k > self.items.pos:
                    progress(k - self.items.pos)
                self.items.advance(k)
                yield k, state, seen
