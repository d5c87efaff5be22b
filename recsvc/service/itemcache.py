"""In-process item data (numpy rows + popularity index), refreshed in the background.

The request path never reads item keys: it uses the last view, at most
``item_refresh_secs`` old while Redis is up, and the last good one when not.
A refresh reads each item shard's changes since the last one
(``recsvc.store.items``) and writes them into the table in place, on the event
loop between requests (O(changed rows), never a copy of the table); a request
sees each row whole, old or new. The popularity index and the models'
neighbour bindings are then rebuilt in a thread and swapped in whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from features.neighbours import Binding, NeighbourTable
from features.popularity import PopularityIndex, PopularityRanking
from features.state import ItemTable
from recsvc.ops import metrics
from recsvc.store.feature_store import FeatureStore, fresh_cursors
from recsvc.store.items import ItemsRead, patch_table, rows_needed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemView:
    """An item table with its popularity index, and the loaded models' neighbour
    tables bound to its rows; replaced whole. The table's rows are patched in
    place by later refreshes (its items are only ever added, within an epoch)."""

    table: ItemTable
    popularity: PopularityIndex
    epoch: str = ""
    version: int = -1
    # Model key (LoadedModel.key) -> its neighbour table's binding to ``table``.
    bindings: dict[str, Binding] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> ItemView:
        table = ItemTable()
        return cls(table, PopularityIndex.build(table, time.time()))


# (model key, its neighbour table) for every loaded model that has one.
NeighbourSource = Callable[[], Iterable[tuple[str, NeighbourTable]]]


def _build(
    table: ItemTable,
    ranking: PopularityRanking,
    previous: ItemView,
    same: bool,
    epoch: str,
    version: int,
    now: float,
    neighbours: Iterable[tuple[str, NeighbourTable]] = (),
) -> ItemView:
    """The view over ``table`` (``same``: the previous view's table, patched), with
    every neighbour table bound: CPU work, in a thread."""
    bindings = {
        key: nt.bind(table, previous.bindings.get(key) if same else None) for key, nt in neighbours
    }
    return ItemView(table, ranking.index(now), epoch, version, bindings)


class ItemCache:
    """Holds the current ItemView; a refresh swaps in a new one in a single assignment."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.view = ItemView.empty()
        self.cursors = fresh_cursors()
        self.ranking = PopularityRanking(self.view.table)
        self.refreshed_at: float | None = None
        # Rows the last refresh wrote (all of them after a full load).
        self.last_changed = 0
        # Shards last seen with more ids than rows (logged once each).
        self.damaged: set[int] = set()
        # The loaded models' neighbour tables, bound with every view (set by the app).
        self.neighbours: NeighbourSource = lambda: ()

    def bind_now(self, table: NeighbourTable) -> tuple[str, Binding]:
        """Bind a newly loaded model's table to the current view (in the loading
        thread), so it serves with its learned features before the next refresh."""
        view = self.view
        return view.epoch, table.bind(view.table)

    @property
    def ready(self) -> bool:
        """Whether the item data in memory is what Redis held at a successful
        load (even none: a new shop whose events create its items must get
        traffic to get items)."""
        return self.refreshed_at is not None

    def age(self) -> float | None:
        return None if self.refreshed_at is None else time.monotonic() - self.refreshed_at

    async def refresh(self) -> None:
        """Read what changed in every shard and apply it; re-rank popularity (decay
        moves it anyway). A shard from another epoch means the item keys were
        rebuilt: everything is read again into a new table."""
        current = self.view
        loaded = current.version >= 0
        known_categories = len(current.table.categories) if loaded else 0
        if loaded:
            read = await self.store.read_items(self.cursors, known_categories)
            if read.rebuilt(self.cursors):
                log.warning("item shards were rebuilt in Redis: reloading every item")
                loaded = False
        if loaded:
            table = current.table
            try:
                changed = await self._patch(table, read)
                self.last_changed = len(changed)
                self.cursors = [s.cursor() for s in read.shards]
                await asyncio.to_thread(self.ranking.update, table, changed)
            except Exception:
                # Half applied: keep serving what is there, reload everything next time.
                self.cursors = fresh_cursors()
                self.view = replace(current, version=-1)
                raise
        else:
            table, read = await self.store.load_items()
            self.last_changed = table.count
            self.ranking = await asyncio.to_thread(PopularityRanking, table)
            self.cursors = [s.cursor() for s in read.shards]
        self._report(read)
        neighbours = list(self.neighbours())
        self.view = await asyncio.to_thread(
            _build,
            table,
            self.ranking,
            current,
            loaded,
            read.epoch,
            read.version,
            time.time(),
            neighbours,
        )
        self.refreshed_at = time.monotonic()

    def _report(self, read: ItemsRead) -> None:
        """Log a damaged shard (ids without rows) once until it is whole again."""
        damaged = {s.shard for s in read.shards if s.damaged}
        for shard in sorted(damaged - self.damaged):
            log.error(
                "item shard %d is damaged: more ids than rows; serving the items with "
                "rows, refusing writes there until it is repaired (docs/storage.md)",
                shard,
            )
        self.damaged = damaged

    @staticmethod
    async def _patch(table: ItemTable, read: ItemsRead) -> np.ndarray:
        """Write the changes into ``table``: room for new rows first (a copy, in a
        thread, only when it grows past its capacity), then the rows, on the loop.
        Returns the rows that changed."""
        needed = rows_needed(table, read)
        if needed > table.capacity:
            await asyncio.to_thread(table.reserve, needed)
        return np.asarray(patch_table(table, read), np.int64)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh until ``stop``; failures keep the last good view, logged once per streak.

        Stopping by event rather than cancellation never abandons a Redis
        command half way, which would leave its connection behind.
        """
        failing = False
        while not stop.is_set():
            try:
                await self.refresh()
                if failing:
                    log.info("item cache refresh recovered")
                failing = False
            except Exception as exc:  # never let the refresher die: serving depends on it
                metrics.REDIS_ERRORS.labels("items", type(exc).__name__).inc()
                if not failing:
                    log.warning("item cache refresh failed, keeping the last good copy: %r", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
