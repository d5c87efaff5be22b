"""In-process item data (numpy rows + popularity index), refreshed in the background.

The request path never reads item keys: it uses the last snapshot, at most
``item_refresh_secs`` old while Redis is up, and the last good one when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from features.popularity import PopularityIndex
from features.state import ItemTable
from recsvc import metrics
from recsvc.store import FeatureStore, ItemSnapshot, table_from_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemView:
    """One consistent item table and its popularity index; replaced whole, never mutated."""

    table: ItemTable
    popularity: PopularityIndex
    epoch: str = ""
    version: int = -1

    @classmethod
    def empty(cls) -> ItemView:
        table = ItemTable()
        return cls(table, PopularityIndex.build(table, time.time()))


def _build(snap: ItemSnapshot | None, previous: ItemView, now: float) -> ItemView:
    """New view from a snapshot (or the previous rows re-ranked): CPU work, run in a thread."""
    if snap is None:
        table, epoch, version = previous.table, previous.epoch, previous.version
    else:
        same = snap.epoch == previous.epoch and previous.version >= 0
        table = table_from_snapshot(snap, previous.table if same else None)
        epoch, version = snap.epoch, snap.version
    return ItemView(table, PopularityIndex.build(table, now), epoch, version)


class ItemCache:
    """Holds the current ItemView; a refresh swaps in a new one in a single assignment."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.view = ItemView.empty()
        self.refreshed_at: float | None = None

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
        self.view = await asyncio.to_thread(_build, snap, current, time.time())
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
