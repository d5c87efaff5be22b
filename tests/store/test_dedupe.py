"""User-side dedupe values (issue 17, finding 10): a retry applies the first
attempt's time on both sides, and a value holds the co-visit partners only
while some item shard still lacks their pairs."""

from __future__ import annotations

import numpy as np
import pytest
from redis.asyncio import Redis

from features.events import COVISIT_BUCKET_SECS
from features.replay import Replay
from features.state import COL_COUNTS, COL_NBR, COL_NBR_REF, COL_REF, shard_of
from recsvc.store import keys
from recsvc.store.feature_store import EventWrite, FeatureStore, ItemWriteFailed
from tests.helpers import canonical, store_settings
from tests.store.test_store import damage_shards, repair_shards

pytestmark = pytest.mark.asyncio
# The start of an hour: events a minute apart share a co-visitation bucket.
T = 1_790_000_000.0 - 1_790_000_000.0 % COVISIT_BUCKET_SECS


def _two_shards() -> tuple[str, str]:
    a = "item-a"
    b = next(f"item-b{k}" for k in range(100) if shard_of(f"item-b{k}") != shard_of(a))
    return a, b


async def test_a_retry_counts_at_the_first_attempts_time_and_type_on_the_item_side(
    aredis: Redis,
) -> None:
    """A view of b pairs with a; a's shard refuses the pair, then is repaired.
    The retry comes two hours later as a click (an event without ts gets the
    retry's clock): the item side must still apply the view at its first
    time, as the user side did, or a's row disagrees with the replay."""
    store = FeatureStore(aredis, store_settings(user_ttl_days=0))
    a, b = _two_shards()
    await store.upsert_items([(a, "", 0.0), (b, "", 0.0)])
    assert await store.apply_events([EventWrite("u", a, 0, T, "first")]) == [1]
    saved = await damage_shards(aredis, {shard_of(a)})
    with pytest.raises(ItemWriteFailed):
        await store.apply_events([EventWrite("u", b, 0, T + 60, "second")])
    await repair_shards(aredis, saved)
    seen = keys.user_event_seen("u", "second")
    assert (await aredis.get(seen) or b"").endswith(b"\n" + a.encode())  # kept: a lacks its pair
    retry = EventWrite("u", b, 1, T + 2 * COVISIT_BUCKET_SECS, "second")
    assert await store.apply_events([retry]) == [0]

    replay = Replay()
    for item in (a, b):
        replay.items.upsert_item(item, "", 0.0)
    replay.apply(T, "u", a, 0)
    replay.apply(T + 60, "u", b, 0)
    table = await store.item_table()
    assert table.ids == replay.items.ids
    np.testing.assert_array_equal(canonical(table.raw), canonical(replay.items.raw))
    assert await aredis.get(seen) == b"\x00" + np.float64(T + 60).tobytes() + b.encode()


async def test_a_dedupe_value_drops_the_partners_once_the_item_side_has_them(
    aredis: Redis,
) -> None:
    """Twenty items in one hour: the twentieth pairs with nineteen. Its dedupe
    key held all their ids for a day (here ~2.5 KB); once every shard has
    its pairs it holds type, time and item, and the key stays where it was
    in Redis's memory terms: well under 200 bytes."""
    store = FeatureStore(aredis, store_settings(user_ttl_days=0))
    items = [f"item-{k:03d}-{'x' * 110}" for k in range(20)]
    walks = [EventWrite("w", item, 0, T + k, f"ev{k}") for k, item in enumerate(items)]
    assert await store.apply_events(walks) == [1] * 20
    seen = keys.user_event_seen("w", "ev19")
    value = await aredis.get(seen)
    assert value == b"\x00" + np.float64(T + 19).tobytes() + items[19].encode()
    assert 0 < await aredis.memory_usage(seen, samples=0) < 250
    assert await aredis.ttl(seen) > store.dedupe_ttl  # its expiry kept
    # The pairs are all there, and a retry still counts nothing twice.
    table = await store.item_table()
    before = table.raw.copy()
    assert await store.apply_events(walks) == [0] * 20
    np.testing.assert_array_equal((await store.item_table()).raw, before)


async def test_a_value_from_before_times_were_kept_still_deduplicates(aredis: Redis) -> None:
    """A dedupe value an older recsvc wrote (item, then partners, one per
    line) answers its item and partners, with the retry's type and time."""
    store = FeatureStore(aredis, store_settings(user_ttl_days=0))
    a, b = _two_shards()
    await store.upsert_items([(a, "", 0.0), (b, "", 0.0)])
    await aredis.set(keys.user_event_seen("old", "e1"), f"{b}\n{a}", ex=3600)
    assert await store.apply_events([EventWrite("old", "other", 0, T, "e1")]) == [0]
    table = await store.item_table()
    counts = table.raw[:, COL_COUNTS:COL_NBR_REF]
    assert counts[table.index["other"]].sum() == 0.0  # the retry's item counts nothing
    assert counts[table.index[b]].sum() > 0.0  # the first attempt's does, at the retry's time
    assert table.raw[table.index[b], COL_REF] == T
    assert table.raw[table.index[a], COL_NBR] == table.index[b] + 1  # a got its pair with b
