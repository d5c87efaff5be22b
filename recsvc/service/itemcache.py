"""In-process item data (numpy rows + popularity index), refreshed in the background.

The request path never reads item keys: it uses the last snapshot, at most
``item_refresh_secs`` old while Redis is up, and the last good one when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from features.neighbours import Binding, NeighbourTable
from features.popularity import PopularityIndex
from features.state import ItemTable
from recsvc.ops import metrics
from recsvc.store.feature_store import FeatureStore, ItemSnapshot, table_from_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemView:
    """One consistent item table and its popularity index, and the loaded models'
    neighbour tables bound to its rows; replaced whole, never mutated."""

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
    snap: ItemSnapshot | None,
    previous: ItemView,
    now: float,
    neighbours: Iterable[tuple[str, NeighbourTable]] = (),
) -> ItemView:
    """New view from a snapshot (or the previous rows re-ranked), with every neighbour
    table bound to it: CPU work, run in a thread."""
    if snap is None:
        table, epoch, version, same = previous.table, previous.epoch, previous.version, True
    else:
        same = snap.epoch == previous.epoch and previous.version >= 0
        table = table_from_snapshot(snap, previous.table if same else None)
        epoch, version = snap.epoch, snap.version
    bindings = {
        key: nt.bind(table, previous.bindings.get(key) if same else None) for key, nt in neighbours
    }
    return ItemView(table, PopularityIndex.build(table, now), epoch, version, bindings)


class ItemCache:
    """Holds the current ItemView; a refresh swaps in a new one in a single assignment."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.view = ItemView.empty()
        self.refreshed_at: float | None = None
        # The loaded models' neighbour tables, bound with every view (set by the app).
        self.neighbours: NeighbourSource = lambda: ()

    def bind_now(self, table: NeighbourTable) -> tuple[str, Binding]:
        """Bind a newly loaded model's table to the current view (in the loading
        thread), so it serves with its learned features before the next refresh."""
        view = self.view
        return view.epoch, table.bind(view.table)

    @property
    def ready(self) -> bool:
        return self.view.table.n > 0

    def age(self) -> float | None:
        return None if self.refreshed_at is None else time.monotonic() - self.refreshed_at

    async def refresh(self) -> None:
        """Copy the item rows changed since the last refresh, rebuild popularity
        (decay moves it anyway).

        A changed epoch means the item keys were rebuilt: reload everything.
        The numpy work runs in a worker thread so requests keep flowing.
        """
        current = self.view
        known = current.version >= 0
        snap: ItemSnapshot | None = await self.store.item_snapshot(
            current.table.n if known else 0,
            len(current.table.categories) if known else 0,
            current.version if known else -1,
            current.epoch if known else "",
        )
        if known and snap and (snap.epoch, snap.version) == (current.epoch, current.version):
            snap = None  # nothing changed: keep the table, re-rank for decay
        neighbours = list(self.neighbours())
        self.view = await asyncio.to_thread(_build, snap, current, time.time(), neighbours)
        self.refreshed_at = time.monotonic()

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
