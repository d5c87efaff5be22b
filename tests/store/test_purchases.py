"""A user's purchases are capped (issue 17, finding 5): read on every
recommendation, so what Redis keeps and returns is bounded."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from features.events import PURCHASED_MAX
from recsvc.store import keys
from recsvc.store.feature_store import EventWrite, FeatureStore
from tests.helpers import store_settings

pytestmark = pytest.mark.asyncio
T0 = 1_790_000_000.0


async def test_a_users_purchases_keep_the_newest_and_no_more(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    buys = [EventWrite("buyer", f"b{k}", 3, T0 + k, f"e{k}") for k in range(PURCHASED_MAX + 100)]
    for k in range(0, len(buys), 100):
        assert all(await store.apply_events(buys[k : k + 100]))
    key = keys.user_purchased("buyer")
    assert await aredis.type(key) == b"zset"  # scored by time: the oldest can go
    assert await aredis.zcard(key) == PURCHASED_MAX
    user = await store.fetch_user("buyer")
    assert user is not None
    assert user.purchased == {w.item_id for w in buys[-PURCHASED_MAX:]}
    assert await aredis.zscore(key, "b299") == T0 + 299
    # Bought again: the newer time counts, and the oldest kept one drops out.
    again = EventWrite("buyer", "b0", 3, T0 + 10_000, "again")
    assert await store.apply_events([again]) == [1]
    user = await store.fetch_user("buyer")
    assert user is not None and "b0" in user.purchased and "b100" not in user.purchased
    assert len(user.purchased) == PURCHASED_MAX


async def test_an_unbounded_set_from_before_the_cap_is_read_as_none_then_capped(
    aredis: Redis,
) -> None:
    """Data written by an older recsvc: the purchased key is a set. Reading it
    must not fail the read (nor count against Redis in the breaker); the
    user's next event turns it into the capped sorted set, keeping some of it
    as the oldest purchases."""
    store = FeatureStore(aredis, store_settings(breaker_failures=1))
    assert await store.apply_events([EventWrite("old", "x", 0, T0, "v0")]) == [1]
    key = keys.user_purchased("old")
    await aredis.sadd(key, *(f"legacy{k}" for k in range(1000)))
    for _ in range(3):
        user = await store.fetch_user("old")
        assert user is not None and user.n_events == 1 and user.purchased == set()
    assert store.breaker.state == "closed"
    assert await store.apply_events([EventWrite("old", "new", 3, T0 + 5, "p1")]) == [1]
    assert await aredis.type(key) == b"zset"
    assert await aredis.zcard(key) == PURCHASED_MAX
    assert await aredis.zscore(key, "new") == T0 + 5
    user = await store.fetch_user("old")
    assert user is not None and "new" in user.purchased
    legacy = {i for i in user.purchased if i.startswith("legacy")}
    assert len(legacy) == PURCHASED_MAX - 1
    assert {await aredis.zscore(key, i) for i in legacy} == {0.0}
