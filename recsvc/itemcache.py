"""In-process item data (numpy rows + popularity index), refreshed in the background.

The request path never reads item keys: it uses the last snapshot, at most
``item_refresh_secs`` old while Redis is up, and the last good one when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.exceptions import RedisError

from features.popularity import PopularityIndex
from features.state import ItemTable
from recsvc.store import FeatureStore, table_from_snapshot

log = logging.getLogger(__name__)


class ItemCache:
    """The latest item table and popularity index; replaced whole, never mutated."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.table = ItemTable()
        self.popularity = PopularityIndex.build(self.table, time.time())
        self.version = -1
        self.refreshed_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.table.n > 0

    def age(self) -> float | None:
        return None if self.refreshed_at is None else time.monotonic() - self.refreshed_at

    async def refresh(self) -> None:
        """Copy item rows when they changed; rebuild popularity (decay moves it anyway)."""
        version = await self.store.item_version()
        if version != self.version:
            snap = await self.store.item_snapshot(self.table.n, len(self.table.categories))
            self.table = table_from_snapshot(snap, self.table if self.version >= 0 else None)
            self.version = snap.version
        self.popularity = PopularityIndex.build(self.table, time.time())
        self.refreshed_at = time.monotonic()

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh until ``stop``; failures keep the last good copy, logged once per streak.

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
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning("item cache refresh failed: %s", type(exc).__name__)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
