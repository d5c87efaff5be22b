"""Item shards fail alone: a full or broken shard fails only the events that need
it, with nothing of theirs written there, and a retry is exactly-once."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from features.state import COL_COUNTS, COL_NBR, COL_NBR_REF, N_SHARDS, shard_of
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.store import keys
from recsvc.store.codec import ITEM_ROW_BYTES
from recsvc.store.feature_store import EventWrite, FeatureStore, ItemWriteFailed
from tests.helpers import store_settings

pytestmark = pytest.mark.asyncio
T = time.time() - 600.0
MIB = 1024 * 1024


def ids_in_shard(shard: int, count: int, prefix: str) -> list[str]:
    out, k = [], 0
    while len(out) < count:
        item = f"{prefix}{k}"
        if shard_of(item) == shard:
            out.append(item)
        k += 1
    return out


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
    single = await client.post("/v1/events", json=event("h3", bad))
    assert single.status == 503
    assert (await single.json())["error"]["code"] == "feature_store_unavailable"
