"""The in-process item cache follows Redis, including a wipe and rebuild."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from recsvc.service.itemcache import ItemCache
from recsvc.store.feature_store import EventWrite, FeatureStore
from tests.helpers import store_settings

pytestmark = pytest.mark.asyncio
T0 = time.time()


async def test_cache_picks_up_new_items_and_events(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([("a", "c1", 5.0), ("b", "c2", 7.0)])
    cache = ItemCache(store)
    await cache.refresh()
    assert cache.view.table.ids == ["a", "b"]
    old_view = cache.view
    await store.apply_events([EventWrite("u1", "b", 3, T0), EventWrite("u1", "z", 0, T0)])
    await cache.refresh()
    assert cache.view.table.ids == ["a", "b", "z"]
    assert cache.view.popularity.top[0] == cache.view.table.index["b"]
    # The view a request may still hold is untouched.
    assert old_view.table.ids == ["a", "b"] and "z" not in old_view.table.index


async def test_cache_reloads_after_the_item_keys_are_rebuilt(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([(f"old{k}", "c1", 1.0) for k in range(5)])
    cache = ItemCache(store)
    await cache.refresh()
    await aredis.flushall()
    # Fewer items, and the change counter ends where it was before.
    await store.upsert_items([("n0", "c9", 2.0), ("n1", "c9", 3.0), ("n2", "c8", 4.0)])
    for _ in range(2):
        await aredis.incr("{items}:ver")
    await cache.refresh()
    table = cache.view.table
    assert table.ids == ["n0", "n1", "n2"]
    assert table.categories == ["c9", "c8"]
    assert table.raw[table.index["n2"], 2] == 4.0
