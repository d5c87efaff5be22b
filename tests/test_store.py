"""The Redis store against the pure state: parity, dedupe, one-round-trip reads."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from redis.asyncio import Redis

from features.candidates import CandidateConfig, from_sources
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import build_matrix
from features.synthetic import SyntheticData
from recsvc.errors import StoreUnavailable
from recsvc.settings import Settings
from recsvc.store import EventWrite, FeatureStore, connect, table_from_snapshot

pytestmark = pytest.mark.asyncio


def _writes(data: SyntheticData, limit: int) -> list[EventWrite]:
    cat = data.catalogue
    meta = dict(
        zip(cat.item_ids, zip(cat.categories, cat.prices.tolist(), strict=True), strict=True)
    )
    out = []
    for k, (ts, user, item, t) in enumerate(data.events.rows()):
        if k >= limit:
            break
        category, price = meta[item]
        out.append(EventWrite(user, item, t, ts, f"ev{k}", category, price))
    return out


@pytest.mark.parametrize("order", ["time", "shuffled"])
async def test_redis_and_pure_replay_give_identical_features(
    aredis: Redis, small_data: SyntheticData, order: str
) -> None:
    """Same events through Lua and through features/: the same state and features.

    Shuffled order exercises the late-event branches; some events name items the
    catalogue does not have. Writers pass the item table's attributes (none for
    an unknown item), which is what the replay uses.
    """
    store = FeatureStore(aredis, Settings(user_ttl_days=0))
    writes = _writes(small_data, 6000)
    strangers = [
        EventWrite(f"u{k}", f"new-item-{k % 7}", k % 4, writes[k * 50].ts + 0.5, f"x{k}")
        for k in range(60)
    ]
    writes = writes + strangers
    if order == "shuffled":
        random.Random(4).shuffle(writes)
    catalogue = small_data.catalogue
    await store.upsert_items(
        list(zip(catalogue.item_ids, catalogue.categories, catalogue.prices.tolist(), strict=True))
    )
    for k in range(0, len(writes), 500):
        assert all(await store.apply_events(writes[k : k + 500]))

    replay = Replay(catalogue)
    for w in writes:
        replay.apply(w.ts, w.user_id, w.item_id, w.type)

    snap = await store.item_snapshot(0, 0)
    table = table_from_snapshot(snap, None)
    assert table.ids == replay.items.ids
    assert table.categories == replay.items.categories
    if order == "time":
        np.testing.assert_array_equal(table.raw, replay.items.raw)
    else:  # the same events in another order: equal up to float rounding
        np.testing.assert_allclose(table.raw, replay.items.raw, rtol=1e-12)

    now = max(w.ts for w in writes) + 60.0
    pop = PopularityIndex.build(table, now)
    users = sorted({w.user_id for w in writes})[:60]
    for user_id in users:
        online = await store.fetch_user(user_id)
        offline = replay.users[user_id]
        assert online is not None
        if order == "time":
            assert online == offline, user_id
        cand = from_sources(offline, table, pop, CandidateConfig(), np.zeros(0, np.int64))
        np.testing.assert_allclose(
            build_matrix(online, table, cand.index, now),
            build_matrix(offline, replay.items, cand.index, now),
            rtol=1e-6 if order == "shuffled" else 0,
        )


async def test_event_ids_apply_once_even_concurrently(aredis: Redis) -> None:
    store = FeatureStore(aredis, Settings())
    e = EventWrite("u1", "i1", 1, 1_700_000_000.0, "same-id", "c1", 5.0)
    results = await asyncio.gather(*(store.apply_events([e]) for _ in range(8)))
    assert sorted(r[0] for r in results) == [0] * 7 + [1]
    state = await store.fetch_user("u1")
    assert state is not None and state.n_events == 1
    snap = await store.item_snapshot(0, 0)
    assert snap.raw[0, 4:].sum() == pytest.approx(3.0)  # one click at three half-lives


async def test_batch_reports_duplicates_per_event(aredis: Redis) -> None:
    store = FeatureStore(aredis, Settings())
    a = EventWrite("u1", "i1", 0, 1_700_000_000.0, "a")
    b = EventWrite("u2", "i2", 0, 1_700_000_001.0, "b")
    assert await store.apply_events([a]) == [1]
    assert await store.apply_events([a, b, b]) == [0, 1, 0]


async def test_unknown_user_reads_as_none(aredis: Redis) -> None:
    assert await FeatureStore(aredis, Settings()).fetch_user("nobody") is None


async def test_dead_redis_raises_store_unavailable_and_opens_circuit(tmp_path: object) -> None:
    settings = Settings(breaker_failures=2, breaker_reset_secs=60.0)
    client = connect("unix:///nonexistent/recsvc.sock", settings)
    store = FeatureStore(client, settings)
    reasons = []
    for _ in range(4):
        with pytest.raises(StoreUnavailable) as info:
            await store.fetch_user("u1")
        reasons.append(info.value.reason)
    assert reasons[-1] == "circuit_open"
    assert store.breaker.state == "open"
    await client.aclose()
