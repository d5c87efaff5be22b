"""The in-process item cache follows Redis, including a wipe and rebuild."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from recsvc.service.itemcache import ItemCache
from recsvc.store import keys
from recsvc.store.feature_store import EventWrite, FeatureStore
from tests.helpers import store_settings

pytestmark = pytest.mark.asyncio
T0 = time.time()


async def test_cache_picks_up_new_items_and_events(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([("a", "c1", 5.0), ("b", "c2", 7.0)])
    cache = ItemCache(store)
    await cache.refresh()
    assert set(cache.view.table.index) == {"a", "b"} and cache.view.table.count == 2
    old_view = cache.view
    await store.apply_events([EventWrite("u1", "b", 3, T0), EventWrite("u1", "z", 0, T0)])
    await cache.refresh()
    table = cache.view.table
    assert set(table.index) == {"a", "b", "z"} and table.count == 3
    assert [table.ids[r] for r in table.added] == ["a", "b", "z"]
    assert cache.view.popularity.top[0] == table.index["b"]
    # Patched in place (never copied), and equal to a fresh read of every shard.
    assert old_view.table is table
    fresh = await store.item_table()
    assert fresh.ids == table.ids and (fresh.raw == table.raw).all()
    # The popularity a request may still hold is its own.
    assert table.index["z"] not in old_view.popularity.top.tolist()


async def test_cache_reloads_after_the_item_keys_are_rebuilt(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([(f"old{k}", "c1", 1.0) for k in range(5)])
    cache = ItemCache(store)
    await cache.refresh()
    before = cache.cursors
    await aredis.flushall()
    # Fewer items, and each shard's change counter ends where it was before.
    await store.upsert_items([("n0", "c9", 2.0), ("n1", "c9", 3.0), ("n2", "c8", 4.0)])
    for shard, cursor in enumerate(before):
        if cursor.version > 0:
            await aredis.hset(keys.shard_keys(shard)[3], "ver", cursor.version)
    await cache.refresh()
    table = cache.view.table
    assert set(table.index) == {"n0", "n1", "n2"} and table.count == 3
    assert table.categories == ["c9", "c8"]
    assert table.raw[table.index["n2"], 2] == 4.0
