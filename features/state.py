"""Per-user and per-item behaviour state, and the one definition of its update math.

Decayed counters are stored as values at a reference time (``ref``). An event
newer than ``ref`` decays everything to the event time and adds its weight; an
older one adds its weight decayed to ``ref``. Either way the state after a set
of events does not depend on their arrival order (to float tolerance).

``recsvc/lua/*.lua`` mirrors these functions operation for operation (same
order of float operations, ``2 ** x`` through C ``pow``), so a replay through
Redis and through this module gives the same numbers.
"""

from __future__ import annotations

import math
import zlib
from array import array
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from features.events import (
    CATEGORY_HALF_LIFE,
    CATEGORY_WEIGHTS,
    COVISIT_BUCKET_ITEMS,
    COVISIT_BUCKET_SECS,
    COVISIT_HALF_LIFE,
    COVISIT_KEEP_SECS,
    COVISIT_NEIGHBOURS,
    HALF_LIVES,
    N_COUNTERS,
    N_HALF_LIVES,
    PURCHASED_MAX,
    RECENT_MAX,
)

NO_CATEGORY = -1
# (item, ts) -> (ts, item): the recent items' order key.
_TIME_THEN_ID = itemgetter(1, 0)

# Item record layout: one float64 row per item (also the Redis byte layout).
COL_REF = 0
COL_FIRST_SEEN = 1
COL_PRICE = 2
COL_CATEGORY = 3
COL_COUNTS = 4
# Co-visitation neighbours: a reference time, then COVISIT_NEIGHBOURS slots of
# (item index + 1; 0 = empty) and as many decayed pair counts at that time.
COL_NBR_REF = COL_COUNTS + N_COUNTERS
COL_NBR = COL_NBR_REF + 1
COL_NBR_SCORE = COL_NBR + COVISIT_NEIGHBOURS
ITEM_WIDTH = COL_NBR_SCORE + COVISIT_NEIGHBOURS

# Item rows are sharded (in Redis: one hash tag, row string and version per
# shard) by a stable hash of the id. An item's row index says where it lives,
# ``position in its shard * N_SHARDS + shard``, so every table (the Redis
# shards, each serving process, the offline replay) agrees on it without
# coordination; a table therefore has empty rows (``ItemTable.present``) where
# a shard holds fewer items than the largest. Part of the storage format.
N_SHARDS = 96


def shard_of(item_id: str) -> int:
    """The shard an item's state lives in (CRC-32 of the id's UTF-8 bytes)."""
    return zlib.crc32(item_id.encode()) % N_SHARDS


def item_row(shard: int, position: int) -> int:
    """Row index of the item at ``position`` in ``shard``."""
    return position * N_SHARDS + shard


@dataclass(slots=True)
class UserState:
    """What the service knows about one user, as stored (not yet decayed to now)."""

    ref: float = 0.0
    counts: list[float] = field(default_factory=lambda: [0.0] * N_COUNTERS)
    category_affinity: dict[str, float] = field(default_factory=dict)
    recent: dict[str, float] = field(default_factory=dict)
    # The items of the newest PURCHASED_MAX purchases (by each item's newest).
    purchased: set[str] = field(default_factory=set)
    last_ts: float = 0.0
    last_purchase_ts: float = 0.0
    price_sum: float = 0.0
    price_n: int = 0
    n_events: int = 0
    # Co-visitation buckets (bucket -> items in it): written by the event path,
    # never read by serving, so not part of what the store decodes or compares.
    visits: dict[int, list[str]] = field(default_factory=dict, compare=False)
    # When each purchased item was last bought: the replay drops the oldest
    # past PURCHASED_MAX by it, as Redis does by its sorted set's scores.
    # Serving reads only which items, so neither decoded nor compared either.
    purchase_times: dict[str, float] = field(default_factory=dict, compare=False)

    def recent_newest_first(self) -> list[tuple[str, float]]:
        """Recent items, newest first (ties: larger id first, as Redis ZREVRANGE)."""
        return sorted(self.recent.items(), key=_TIME_THEN_ID, reverse=True)


def covisit_bucket(ts: float) -> int:
    """The co-visitation bucket of an event time (``math.floor`` as the Lua does)."""
    return math.floor(ts / COVISIT_BUCKET_SECS)


def visit_partners(s: UserState, item_id: str, ts: float) -> list[str]:
    """Record (bucket, item) for a user; the items it pairs with (none when the item
    was already in the bucket, or the bucket is full). Mirrors ``lua/user_event.lua``.

    The set of pairs a user's events produce does not depend on arrival order:
    each pair of distinct items in a bucket is produced once, by whichever of the
    two arrives second (exact while a bucket holds at most COVISIT_BUCKET_ITEMS,
    and for events at most COVISIT_KEEP_SECS older than the user's newest, which
    the service guarantees by refusing events older than its dedupe window).
    Expects ``s.last_ts`` to include this event already.
    """
    b = covisit_bucket(ts)
    oldest = math.floor((s.last_ts - COVISIT_KEEP_SECS) / COVISIT_BUCKET_SECS)
    if b < oldest:
        return []
    members = s.visits.setdefault(b, [])
    if item_id in members or len(members) >= COVISIT_BUCKET_ITEMS:
        return []
    partners = sorted(members)  # canonical: the store sorts the Lua's answer alike
    members.append(item_id)
    for old in [k for k in s.visits if k < oldest]:
        del s.visits[old]
    return partners


def apply_user_event(
    s: UserState, event_type: int, ts: float, item_id: str, category: str, price: float
) -> list[str]:
    """Fold one event into a user's state (mirrored by ``lua/user_event.lua``).

    Returns the items this event forms co-visitation pairs with.
    """
    if s.n_events == 0:
        s.ref = ts
    if ts > s.ref:
        for h, hl in enumerate(HALF_LIVES):
            f = 2.0 ** (-(ts - s.ref) / hl)
            for k in range(h, N_COUNTERS, N_HALF_LIVES):
                s.counts[k] = s.counts[k] * f
        fc = 2.0 ** (-(ts - s.ref) / CATEGORY_HALF_LIFE)
        for c in s.category_affinity:
            s.category_affinity[c] = s.category_affinity[c] * fc
        s.ref = ts
    for h, hl in enumerate(HALF_LIVES):
        k = event_type * N_HALF_LIVES + h
        s.counts[k] = s.counts[k] + 2.0 ** (-(s.ref - ts) / hl)
    if category:
        w = CATEGORY_WEIGHTS[event_type] * 2.0 ** (-(s.ref - ts) / CATEGORY_HALF_LIFE)
        s.category_affinity[category] = s.category_affinity.get(category, 0.0) + w
    s.last_ts = max(s.last_ts, ts)
    partners = visit_partners(s, item_id, ts)
    if event_type == 3:
        s.last_purchase_ts = max(s.last_purchase_ts, ts)
        if ts > s.purchase_times.get(item_id, -np.inf):
            s.purchase_times[item_id] = ts
        s.purchased.add(item_id)
        if len(s.purchase_times) > PURCHASED_MAX:
            # Drop the oldest, as ZREMRANGEBYRANK 0 -(PURCHASED_MAX+1) does. Kept:
            # the newest PURCHASED_MAX items by their newest purchase, whatever
            # the arrival order (an item dropped is never newer than those kept).
            oldest = min(s.purchase_times.items(), key=_TIME_THEN_ID)[0]
            del s.purchase_times[oldest]
            s.purchased.discard(oldest)
    if price > 0:
        s.price_sum = s.price_sum + price
        s.price_n += 1
    s.n_events += 1
    if ts > s.recent.get(item_id, -np.inf):
        s.recent[item_id] = ts
    if len(s.recent) > RECENT_MAX:
        # Drop the oldest, as ZREMRANGEBYRANK 0 -(RECENT_MAX+1) does.
        ordered = sorted(s.recent.items(), key=lambda kv: (kv[1], kv[0]))
        for item, _ in ordered[: len(s.recent) - RECENT_MAX]:
            del s.recent[item]
    return partners


class ItemTable:
    """Item-side state as numpy rows; the same layout offline, in Redis and in the
    serving cache: row ``item_row(shard, position)`` (see N_SHARDS), empty rows
    (id "", ``present`` False, all zeros but category NO_CATEGORY) where a
    shard has fewer items than the largest.

    ``added`` lists the rows in the order their items were added, so whatever
    maps rows to something else (a neighbour table's binding) extends itself by
    the rows added since it last looked, instead of rebuilding.
    """

    __slots__ = (
        "_present",
        "_raw",
        "added",
        "categories",
        "category_index",
        "ids",
        "index",
        "n",
        "shard_counts",
    )

    def __init__(
        self,
        ids: list[str] | None = None,
        categories: list[str] | None = None,
        raw: np.ndarray | None = None,
        index: dict[str, int] | None = None,
        category_index: dict[str, int] | None = None,
    ) -> None:
        self.ids: list[str] = list(ids or [])
        self.index: dict[str, int] = (
            index if index is not None else {item: i for i, item in enumerate(self.ids) if item}
        )
        self.categories: list[str] = list(categories or [])
        self.category_index: dict[str, int] = (
            category_index
            if category_index is not None
            else {c: i for i, c in enumerate(self.categories)}
        )
        self.n = len(self.ids)
        if raw is None:
            raw = empty_rows(max(self.n, 16))
        if raw.shape[0] < self.n or raw.shape[1] != ITEM_WIDTH:
            raise ValueError(f"item rows {raw.shape} do not cover {self.n} items")
        self._raw = raw
        self._present = np.zeros(raw.shape[0], dtype=bool)
        rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        rows.sort()
        self._present[rows] = True
        self.added = array("q", rows.tolist())
        # Items per shard: the next item of shard s goes to row item_row(s, count).
        self.shard_counts = np.zeros(N_SHARDS, dtype=np.int64)
        if len(rows):
            np.maximum.at(self.shard_counts, rows % N_SHARDS, rows // N_SHARDS + 1)

    @property
    def count(self) -> int:
        """How many items the table holds (rows minus empty rows)."""
        return len(self.added)

    @property
    def raw(self) -> np.ndarray:
        """The (n, ITEM_WIDTH) float64 rows, empty rows included."""
        return self._raw[: self.n]

    @property
    def capacity(self) -> int:
        """Rows reserved (see ``reserve``)."""
        return int(self._raw.shape[0])

    @property
    def present(self) -> np.ndarray:
        """(n,) bool: which rows hold an item."""
        return self._present[: self.n]

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows (capacity grows by at least a quarter: amortised
        O(1) growth without doubling a table of millions of rows). Never call
        while another thread writes this table."""
        if rows <= self._raw.shape[0]:
            return
        size = max(rows, self._raw.shape[0] + self._raw.shape[0] // 4)
        grown = empty_rows(size)
        grown[: self.n] = self._raw[: self.n]
        present = np.zeros(size, dtype=bool)
        present[: self.n] = self._present[: self.n]
        self._raw, self._present = grown, present

    def place(self, row: int, item_id: str) -> None:
        """Record ``item_id`` at ``row`` (reserved); its row values are the caller's."""
        if row >= self.n:
            self.ids.extend([""] * (row + 1 - self.n))
            self.n = row + 1
        self.ids[row] = item_id
        self.index[item_id] = row
        self._present[row] = True
        self.added.append(row)
        shard, position = row % N_SHARDS, row // N_SHARDS
        if position >= self.shard_counts[shard]:
            self.shard_counts[shard] = position + 1

    def place_many(self, rows: np.ndarray, item_ids: list[str]) -> None:
        """``place`` for many new items at once (rows reserved, in any order)."""
        if not len(rows):
            return
        top = int(rows.max()) + 1
        if top > self.n:
            self.ids.extend([""] * (top - self.n))
            self.n = top
        ids = self.ids
        for row, item in zip(rows.tolist(), item_ids, strict=True):
            ids[row] = item
        self.index.update(zip(item_ids, rows.tolist(), strict=True))
        self._present[rows] = True
        self.added.frombytes(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        np.maximum.at(self.shard_counts, rows % N_SHARDS, rows // N_SHARDS + 1)

    @property
    def category(self) -> np.ndarray:
        return self.raw[:, COL_CATEGORY].astype(np.int64)

    def category_name(self, row: int) -> str:
        """The category of the item in ``row`` ('' when it has none)."""
        c = int(self.raw[row, COL_CATEGORY])
        return self.categories[c] if c >= 0 else ""

    def category_id(self, category: str) -> int:
        """Index of a category, adding it when new; NO_CATEGORY for ''."""
        if not category:
            return NO_CATEGORY
        c = self.category_index.get(category)
        if c is None:
            c = len(self.categories)
            self.categories.append(category)
            self.category_index[category] = c
        return c

    def ensure_item(self, item_id: str, category: str = "", price: float = 0.0) -> int:
        """Index of an item, creating a minimal record when new (mirrors the Lua)."""
        i = self.index.get(item_id)
        if i is not None:
            return i
        shard = shard_of(item_id)
        i = item_row(shard, int(self.shard_counts[shard]))
        self.reserve(i + 1)
        row = self._raw[i]
        row[:] = 0.0
        row[COL_PRICE] = price
        row[COL_CATEGORY] = self.category_id(category)
        self.place(i, item_id)
        return i

    def upsert_item(self, item_id: str, category: str, price: float) -> int:
        """Set catalogue attributes of an item (creating it when new)."""
        i = self.ensure_item(item_id, category, price)
        self._raw[i, COL_CATEGORY] = self.category_id(category)
        self._raw[i, COL_PRICE] = price
        return i

    def apply_event(self, item_index: int, event_type: int, ts: float) -> None:
        """Fold one event into an item's popularity (mirrors ``lua/item_event.lua``)."""
        row = self._raw[item_index]
        ref = float(row[COL_REF])
        counts = [float(v) for v in row[COL_COUNTS:COL_NBR_REF]]
        if ts > ref:
            for h, hl in enumerate(HALF_LIVES):
                f = 2.0 ** (-(ts - ref) / hl)
                for k in range(h, N_COUNTERS, N_HALF_LIVES):
                    counts[k] = counts[k] * f
            ref = ts
        for h, hl in enumerate(HALF_LIVES):
            k = event_type * N_HALF_LIVES + h
            counts[k] = counts[k] + 2.0 ** (-(ref - ts) / hl)
        row[COL_REF] = ref
        first = float(row[COL_FIRST_SEEN])
        if first == 0.0 or ts < first:
            row[COL_FIRST_SEEN] = ts
        row[COL_COUNTS:COL_NBR_REF] = counts

    def add_neighbour(self, item_index: int, other: int, t: float) -> None:
        """Count one co-visit of ``other`` with an item at time ``t`` (mirrors the Lua).

        Below COVISIT_NEIGHBOURS neighbours the row is exact and order independent;
        a full row replaces its weakest neighbour when the new pair outweighs it
        (then which weak neighbours survive can depend on arrival order).
        """
        row = self._raw[item_index]
        ref = float(row[COL_NBR_REF])
        scores = [float(v) for v in row[COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]]
        if t > ref:
            f = 2.0 ** (-(t - ref) / COVISIT_HALF_LIFE)
            scores = [v * f for v in scores]
            ref = t
        w = 2.0 ** (-(ref - t) / COVISIT_HALF_LIFE)
        slots = [int(v) for v in row[COL_NBR : COL_NBR + COVISIT_NEIGHBOURS]]
        key = other + 1
        if key in slots:
            k = slots.index(key)
            scores[k] = scores[k] + w
        elif 0 in slots:
            k = slots.index(0)
            slots[k], scores[k] = key, w
        else:
            k = min(range(COVISIT_NEIGHBOURS), key=lambda j: (scores[j], slots[j]))
            if w > scores[k]:
                slots[k], scores[k] = key, w
        row[COL_NBR_REF] = ref
        row[COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] = slots
        row[COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = scores

    def add_pairs(self, item_index: int, partners: list[int], t: float) -> None:
        """One event's co-visits: both directions for each partner, in order."""
        for p in partners:
            self.add_neighbour(item_index, p, t)
            self.add_neighbour(p, item_index, t)


def empty_rows(n: int) -> np.ndarray:
    """``n`` empty item rows: zeros, no category."""
    raw = np.zeros((n, ITEM_WIDTH), dtype=np.float64)
    raw[:, COL_CATEGORY] = NO_CATEGORY
    return raw
