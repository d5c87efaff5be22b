"""Item shards fail alone: a full or broken shard fails only the events that need
it, with nothing of theirs written there, and a retry is exactly-once."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from features.state import COL_COUNTS, COL_NBR, COL_NBR_REF, N_SHARDS
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.service.itemcache import ItemCache
from recsvc.store import keys
from recsvc.store.codec import ITEM_ROW_BYTES
from recsvc.store.feature_store import EventWrite, FeatureStore, ItemWriteFailed
from tests.helpers import ids_in_shard, store_settings

pytestmark = pytest.mark.asyncio
T = time.time() - 600.0
MIB = 1024 * 1024


async def _counts(store: FeatureStore, item: str) -> float:
    table = await store.item_table()
    return float(table.raw[table.index[item], COL_COUNTS:COL_NBR_REF].sum())


async def test_a_full_shard_refuses_new_items_and_fails_only_their_events() -> None:
    """The review's case with a small proto-max-bulk-len: a shard at its size limit
    refuses a new item; the events naming it fail with nothing written (no row,
    no user state), the rest of the batch applies, and once there is room a
    retry of the whole batch applies the failed event exactly once."""
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url)
        try:
            await client.config_set("proto-max-bulk-len", MIB)
            store = FeatureStore(client, store_settings())
            await store.check_format()  # reads the limit
            capacity = store.shard_capacity
            assert capacity == MIB // ITEM_ROW_BYTES
            shard = 5
            fill = ids_in_shard(shard, capacity, "f")
            await store.upsert_items([(i, "c", 1.0) for i in fill])
            [newcomer] = ids_in_shard(shard, 1, "late")
            elsewhere = ids_in_shard((shard + 1) % N_SHARDS, 1, "o")[0]
            events = [
                EventWrite("ua", elsewhere, 0, T, "e1"),
                EventWrite("ub", newcomer, 1, T, "e2"),
                EventWrite("uc", fill[0], 3, T, "e3"),
            ]
            with pytest.raises(ItemWriteFailed) as info:
                await store.apply_events(events)
            assert info.value.results == [1, None, 1]
            assert list(info.value.failed) == [1]
            assert f"item shard {shard} is full" in info.value.failed[1]
            idx, _, state, _, _ = keys.shard_keys(shard)
            assert await client.hget(idx, newcomer) is None
            assert await client.strlen(state) == capacity * ITEM_ROW_BYTES
            assert await store.fetch_user("ub") is None  # the user side never ran
            assert await _counts(store, elsewhere) > 0 and await _counts(store, fill[0]) > 0
            # Room again: the failed event once, the others are duplicates.
            await client.config_set("proto-max-bulk-len", 64 * MIB)
            await store.read_limits()
            assert await store.apply_events(events) == [0, 1, 0]
            assert await store.apply_events(events) == [0, 0, 0]
            user = await store.fetch_user("ub")
            assert user is not None and user.n_events == 1
            counted = await _counts(store, newcomer)
            assert counted == pytest.approx(4.0)  # one event, at each of 4 half-lives
        finally:
            await client.aclose()


async def _break(client: Redis, shard: int) -> bytes:
    """Corrupt a shard: its row string no longer matches its id list."""
    state = keys.shard_keys(shard)[2]
    before = bytes(await client.get(state) or b"")
    await client.append(state, b"\x00\x01\x02")
    return before


async def test_a_broken_shard_fails_its_events_and_writes_nothing_there(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    good, bad = ids_in_shard(1, 1, "g")[0], ids_in_shard(2, 1, "b")[0]
    await store.upsert_items([(good, "c", 1.0), (bad, "c", 2.0)])
    intact = await _break(aredis, 2)
    meta = keys.shard_keys(2)[3]
    version = await aredis.hget(meta, "ver")
    events = [EventWrite("u1", good, 0, T, "x1"), EventWrite("u2", bad, 0, T, "x2")]
    with pytest.raises(ItemWriteFailed) as info:
        await store.apply_events(events)
    assert info.value.results == [1, None]
    assert "item shard 2 refused the write" in info.value.failed[1]
    assert "bytes of rows" in info.value.failed[1]
    assert await aredis.hget(meta, "ver") == version  # nothing written there
    assert await store.fetch_user("u2") is None
    await aredis.set(keys.shard_keys(2)[2], intact)  # repaired
    assert await store.apply_events(events) == [0, 1]
    assert await _counts(store, bad) == pytest.approx(4.0)


async def test_a_pair_into_a_broken_shard_lands_once_on_retry(aredis: Redis) -> None:
    """An event whose co-visit partner lives in a broken shard: its own item's
    counters apply, the partner's half of the pair cannot, so the event is
    reported failed. The retry adds only the missing half: counters once, the
    pair once on each row."""
    store = FeatureStore(aredis, store_settings())
    first, second = ids_in_shard(3, 1, "p")[0], ids_in_shard(4, 1, "q")[0]
    hour = (T // 3600.0) * 3600.0
    assert await store.apply_events([EventWrite("v", second, 0, hour + 5.0, "y1")]) == [1]
    intact = await _break(aredis, 4)
    pair = [EventWrite("v", first, 0, hour + 60.0, "y2")]  # same hour: pairs with `second`
    with pytest.raises(ItemWriteFailed) as info:
        await store.apply_events(pair)
    assert info.value.results == [None] and "item shard 4" in info.value.failed[0]
    await aredis.set(keys.shard_keys(4)[2], intact)
    assert await store.apply_events(pair) == [0]  # the user side had applied
    assert await store.apply_events(pair) == [0]
    table = await store.item_table()
    a, b = table.index[first], table.index[second]
    assert await _counts(store, first) == pytest.approx(4.0)
    assert list(table.raw[a, COL_NBR : COL_NBR + 2]) == [b + 1, 0.0]
    assert list(table.raw[b, COL_NBR : COL_NBR + 2]) == [a + 1, 0.0]


async def test_http_reports_failed_events_and_503s_a_single_one(
    client: TestClient[Any, Any], seeded: Redis
) -> None:
    bad = ids_in_shard(7, 1, "http")[0]
    good = ids_in_shard(8, 1, "http")[0]
    await FeatureStore(seeded, store_settings()).upsert_items([(bad, "c", 1.0)])
    await _break(seeded, 7)

    def event(eid: str, item: str) -> dict[str, Any]:
        return {"event_id": eid, "user_id": "h1", "item_id": item, "type": "view", "ts": T}

    resp = await client.post("/v1/events", json={"events": [event("h1", good), event("h2", bad)]})
    assert resp.status == 200
    body = await resp.json()
    assert body["accepted"] == 1 and body["duplicates"] == 0 and body["rejected"] == []
    assert [f["index"] for f in body["failed"]] == [1]
    assert "item shard 7" in body["failed"][0]["error"]
    # Which shard and what to do; Redis's own error text stays in the log.
    assert body["failed"][0]["error"] == "item shard 7 refused the write; retry later"
    single = await client.post("/v1/events", json=event("h3", bad))
    assert single.status == 503
    assert (await single.json())["error"]["code"] == "feature_store_unavailable"


async def test_a_limit_lowered_while_running_never_leaves_a_shard_half_written() -> None:
    """From the review: proto-max-bulk-len lowered after start (the store still
    believes the shard has room). The row string's growth is the script's first
    write, so its failure writes nothing: ids and rows stay in step, the batch's
    other events apply, and a new worker loads every item."""
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url)
        try:
            store = FeatureStore(client, store_settings())
            await store.check_format()
            await store.upsert_items([(i, "c", 1.0) for i in ids_in_shard(7, 2100, "a")])
            await client.config_set("proto-max-bulk-len", MIB)  # 2,148 rows; 2,100 held
            late = ids_in_shard(7, 100, "late")
            other = ids_in_shard(8, 1, "o")[0]
            batch = [EventWrite("u", i, 0, T, f"e{i}") for i in [*late, other]]
            with pytest.raises(ItemWriteFailed) as info:
                await store.apply_events(batch)
            assert sorted(info.value.failed) == list(range(100))
            assert info.value.results[100] == 1
            _, ids, state, _, _ = keys.shard_keys(7)
            assert await client.llen(ids) == 2100
            assert await client.strlen(state) == 2100 * ITEM_ROW_BYTES
            assert await client.hlen(keys.shard_keys(7)[0]) == 2100
            cache = ItemCache(store)
            await cache.refresh()
            assert cache.ready and cache.view.table.count == 2101  # the shard and `other`
            assert not cache.damaged
        finally:
            await client.aclose()


async def test_a_damaged_shard_serves_the_items_it_has_rows_for(aredis: Redis) -> None:
    """Ids without rows (a shard edited or partly evicted by hand): a worker
    still loads, serves only the items with rows, says which shard is damaged,
    and keeps refreshing."""
    store = FeatureStore(aredis, store_settings())
    kept = ids_in_shard(6, 3, "d")
    await store.upsert_items([(i, "c", 1.0) for i in [*kept, "elsewhere"]])
    idx, ids, _, _, _ = keys.shard_keys(6)
    await aredis.rpush(ids, "ghost")
    await aredis.hset(idx, "ghost", 3)
    cache = ItemCache(store)
    await cache.refresh()
    table = cache.view.table
    assert set(table.index) == {*kept, "elsewhere"} and "ghost" not in table.ids
    assert cache.damaged == {6}
    await store.apply_events([EventWrite("u9", "elsewhere", 3, T, "z1")])  # other shards write
    await cache.refresh()
    assert cache.view.popularity.top[0] == cache.view.table.index["elsewhere"]
    assert cache.damaged == {6}


async def test_partners_are_resolved_by_id_so_a_rebuilt_shard_pairs_nothing_stale(
    aredis: Redis,
) -> None:
    """From the review: a user's co-visit buckets outlive a shard whose keys were
    deleted and regrew with other items. Partners are kept as ids and resolved to
    rows at write time: a partner that no longer exists pairs with nothing, and
    the new items never gain neighbours the user never saw."""
    store = FeatureStore(aredis, store_settings())
    a_items, b_items = ids_in_shard(3, 5, "a"), ids_in_shard(9, 5, "b")
    hour = (T // 3600.0) * 3600.0 + 1.0
    visits = [EventWrite("v", b, 0, hour + k, f"v{k}") for k, b in enumerate(b_items)]
    assert await store.apply_events(visits) == [1] * 5
    await aredis.delete(*keys.shard_keys(9))
    newcomers = ids_in_shard(9, 5, "nb")
    others = [EventWrite("x", i, 0, hour + 30 + k, f"x{k}") for k, i in enumerate(newcomers)]
    assert await store.apply_events(others) == [1] * 5
    assert await store.apply_events([EventWrite("v", a_items[3], 0, hour + 40, "v12")]) == [1]
    table = await store.item_table()
    row = table.index[a_items[3]]
    slots = [int(s) - 1 for s in table.raw[row, COL_NBR : COL_NBR + 20] if s]
    assert not any(table.ids[s].startswith("nb") for s in slots)
    # The new items' own neighbours are each other (user x), never `a_items[3]`.
    for item in newcomers:
        neighbours = table.raw[table.index[item], COL_NBR : COL_NBR + 20]
        assert row + 1 not in neighbours.tolist()


async def test_a_reused_event_id_never_counts_another_item(aredis: Redis) -> None:
    """From the review: item-side dedupe keys live in each item's shard, so a
    'retry' naming another item would have been counted in that item's shard.
    A duplicate's item side uses the item its first attempt was applied to."""
    store = FeatureStore(aredis, store_settings())
    first, other = ids_in_shard(1, 1, "r")[0], ids_in_shard(2, 1, "s")[0]
    assert await store.apply_events([EventWrite("u", first, 1, T, "same")]) == [1]
    assert await store.apply_events([EventWrite("u", other, 1, T, "same")]) == [0]
    assert await _counts(store, first) == pytest.approx(4.0)
    table = await store.item_table()
    assert other not in table.index or await _counts(store, other) == 0.0


async def test_a_row_rewrite_past_a_lowered_limit_writes_nothing_and_retries_count_once() -> None:
    """From the second review: with proto-max-bulk-len lowered below a shard's row
    string, a rewrite of a late row fails for size (SETRANGE checks offset +
    length even without growth). Rows are written from the highest offset
    down, so that failure is the first write: nothing lands, and once the
    limit is back a retry counts each event once."""
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url)
        try:
            store = FeatureStore(client, store_settings())
            await store.check_format()
            items = ids_in_shard(7, 2200, "a")  # 1,073,600 bytes of rows
            await store.upsert_items([(i, "c", 1.0) for i in items])
            meta = keys.shard_keys(7)[3]
            version = await client.hget(meta, "ver")
            await client.config_set("proto-max-bulk-len", MIB)
            batch = [
                EventWrite("u1", items[0], 1, T, "e1"),
                EventWrite("u2", items[-1], 1, T, "e2"),
            ]
            for _ in range(3):
                with pytest.raises(ItemWriteFailed):
                    await store.apply_events(batch)
            # A catalogue update of both rows fails whole as well.
            with pytest.raises(ItemWriteFailed):
                await store.upsert_items([(items[0], "d", 2.0), (items[-1], "d", 2.0)])
            assert await client.hget(meta, "ver") == version
            await client.config_set("proto-max-bulk-len", 512 * MIB)
            assert await _counts(store, items[0]) == 0.0
            assert await store.apply_events(batch) == [0, 0]  # the user side had applied
            assert await _counts(store, items[0]) == pytest.approx(4.0)
            assert await _counts(store, items[-1]) == pytest.approx(4.0)
        finally:
            await client.aclose()


async def test_a_partial_trailing_row_does_not_stop_a_new_worker(aredis: Redis) -> None:
    """From the second review: stray bytes on a row string (not whole rows). A new
    worker loads every item, the shard's too (its whole rows), and names it
    damaged; deleting the shard's keys and importing its items again repairs it."""
    store = FeatureStore(aredis, store_settings())
    mine = ids_in_shard(2, 3, "a")
    await store.upsert_items([(i, "c", 1.0) for i in [*mine, "elsewhere"]])
    intact = await _break(aredis, 2)
    assert len(intact) == 3 * ITEM_ROW_BYTES
    cache = ItemCache(store)
    await cache.refresh()
    assert set(cache.view.table.index) == {*mine, "elsewhere"}
    assert cache.damaged == {2}
    with pytest.raises(ItemWriteFailed):
        await store.apply_events([EventWrite("u", mine[0], 0, T, "w1")])
    # The documented repair: delete the shard's keys, import its items again.
    await aredis.delete(*keys.shard_keys(2))
    await store.upsert_items([(i, "c", 1.0) for i in mine])
    # w1 was refused at its first step (nothing written): it applies now.
    assert await store.apply_events([EventWrite("u", mine[0], 0, T, "w1")]) == [1]
    assert await store.apply_events([EventWrite("u", mine[1], 0, T, "w2")]) == [1]
    await cache.refresh()  # another epoch for shard 2: everything read again
    assert cache.damaged == set() and set(cache.view.table.index) == {*mine, "elsewhere"}
    assert await _counts(store, mine[1]) == pytest.approx(4.0)
