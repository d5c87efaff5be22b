"""The Redis store against the pure state: parity, dedupe, one-round-trip reads."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from features.candidates import SOURCE_RELATED, CandidateConfig, assemble, retrieve
from features.events import COVISIT_BUCKET_SECS, HALF_LIVES, PURCHASED_MAX
from features.item2item import LearnConfig, learn
from features.neighbours import Bound, NeighbourTable
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import FEATURE_NAMES, build_matrix
from features.state import COL_COUNTS, COL_NBR_REF, N_SHARDS, shard_of
from features.synthetic import SyntheticData
from recsvc.errors import StoreUnavailable
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.client import connect
from recsvc.store.codec import ITEM_FIELDS, STORAGE_FORMAT, USER_FIELDS
from recsvc.store.feature_store import (
    EventWrite,
    FeatureStore,
    IncompatibleStore,
    ItemWriteFailed,
    fresh_cursors,
)
from recsvc.store.items import ShardCursor, patch_table, rows_needed
from tests.helpers import canonical, neighbour_counts, store_settings

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
    store = FeatureStore(aredis, store_settings(user_ttl_days=0))
    writes = _writes(small_data, 6000)
    strangers = [
        EventWrite(f"u{k}", f"new-item-{k % 7}", k % 4, writes[k * 50].ts + 0.5, f"x{k}")
        for k in range(60)
    ]
    # A user with more purchases than are kept: both sides drop the oldest.
    cat = small_data.catalogue
    collector = [
        EventWrite(
            "collector",
            cat.item_ids[k % 250],
            3,
            writes[100].ts + 37.0 * k,
            f"c{k}",
            cat.categories[k % 250],
            float(cat.prices[k % 250]),
        )
        for k in range(PURCHASED_MAX + 100)
    ]
    writes = writes + strangers + collector
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

    table = await store.item_table()
    assert table.ids == replay.items.ids
    assert table.categories == replay.items.categories
    if order == "time":
        np.testing.assert_array_equal(canonical(table.raw), canonical(replay.items.raw))
    else:  # the same events in another order: equal up to float rounding
        np.testing.assert_allclose(canonical(table.raw), canonical(replay.items.raw), rtol=1e-12)
    assert neighbour_counts(table.raw).sum() > 1000  # co-visitation was exercised
    # Field by field, as the codec declares them: each one compared, and each one
    # exercised (a field the events never change would be compared vacuously).
    online_rows, offline_rows = canonical(table.raw), canonical(replay.items.raw)
    for f in ITEM_FIELDS:
        cols = slice(f.start, f.start + f.width)
        np.testing.assert_allclose(online_rows[:, cols], offline_rows[:, cols], rtol=1e-12)
        assert np.any(offline_rows[:, cols] != 0.0), f"item field {f.name} never set"

    now = max(w.ts for w in writes) + 60.0
    # A learned neighbour table as a model ships it, bound to each side's rows.
    nt = _learned(writes)
    online_nb = Bound(nt, nt.bind(table))
    offline_nb = Bound(nt, nt.bind(replay.items))
    pop = PopularityIndex.build(table, now)
    offline_pop = PopularityIndex.build(replay.items, now)
    config = CandidateConfig()
    users = [*sorted({w.user_id for w in writes})[:60], "collector"]
    learned_cols = [k for k, name in enumerate(FEATURE_NAMES) if name.startswith("nb_")]
    learned_seen = related = 0
    empty = np.zeros(0, np.int64)
    exercised = dict.fromkeys((f.name for f in USER_FIELDS), False)
    for user_id in users:
        online = await store.fetch_user(user_id)
        offline = replay.users[user_id]
        assert online is not None
        if order == "time":
            assert online == offline, user_id
        assert online.purchased == offline.purchased, user_id
        for f in USER_FIELDS:  # the codec's user fields, by name
            got, want = getattr(online, f.name), getattr(offline, f.name)
            assert got == pytest.approx(want, rel=1e-12), (user_id, f.name)
            exercised[f.name] |= bool(np.any(np.asarray(want) != 0.0))
        found_on = retrieve(online, table, pop, config, empty, now, online_nb)
        found_off = retrieve(offline, replay.items, offline_pop, config, empty, now, offline_nb)
        cand = assemble(found_off, config)
        np.testing.assert_array_equal(assemble(found_on, config).index, cand.index)
        online_m = build_matrix(online, table, cand.index, now, retrieval=found_on)
        np.testing.assert_allclose(
            online_m,
            build_matrix(offline, replay.items, cand.index, now, retrieval=found_off),
            rtol=1e-6 if order == "shuffled" else 0,
        )
        learned_seen += int(np.count_nonzero(online_m[:, learned_cols] > 0))
        related += len(found_on.lists[SOURCE_RELATED].items)
    assert learned_seen > 1000 and related > 1000  # the learned table was exercised
    # The cap was exercised: 250 items bought, the newest PURCHASED_MAX kept.
    # Redis stores no more than it reads (the read alone would hide an
    # unbounded key: it asks for the newest PURCHASED_MAX).
    kept = replay.users["collector"].purchase_times
    assert len(kept) == PURCHASED_MAX and min(kept.values()) > collector[49].ts
    assert replay.users["collector"].purchased == set(kept)
    assert await aredis.zcard(keys.user_purchased("collector")) == PURCHASED_MAX
    assert all(exercised.values()), exercised


def _learned(writes: list[EventWrite]) -> NeighbourTable:
    users = {u: k for k, u in enumerate(dict.fromkeys(w.user_id for w in writes))}
    ids = list(dict.fromkeys(w.item_id for w in writes))
    item = {i: k for k, i in enumerate(ids)}
    ordered = sorted(writes, key=lambda w: w.ts)
    return learn(
        np.asarray([w.ts for w in ordered]),
        np.asarray([users[w.user_id] for w in ordered]),
        np.asarray([item[w.item_id] for w in ordered]),
        ids,
        LearnConfig(ease_items=200),
    )


async def test_event_ids_apply_once_even_concurrently(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    e = EventWrite("u1", "i1", 1, 1_700_000_000.0, "same-id", "c1", 5.0)
    results = await asyncio.gather(*(store.apply_events([e]) for _ in range(8)))
    assert sorted(r[0] for r in results) == [0] * 7 + [1]
    state = await store.fetch_user("u1")
    assert state is not None and state.n_events == 1
    table = await store.item_table()
    # One click, counted once at each half-life.
    counts = table.raw[table.index["i1"], COL_COUNTS:COL_NBR_REF]
    assert counts.sum() == pytest.approx(float(len(HALF_LIVES)))


async def test_batch_reports_duplicates_per_event(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    a = EventWrite("u1", "i1", 0, 1_700_000_000.0, "a")
    b = EventWrite("u2", "i2", 0, 1_700_000_001.0, "b")
    assert await store.apply_events([a]) == [1]
    assert await store.apply_events([a, b, b]) == [0, 1, 0]


async def test_unknown_user_reads_as_none(aredis: Redis) -> None:
    assert await FeatureStore(aredis, store_settings()).fetch_user("nobody") is None


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


def _session_writes(n_users: int, seed: int, t0: float) -> list[EventWrite]:
    """Users browsing small groups of items within an hour: many co-visits."""
    rng = random.Random(seed)
    out = []
    for u in range(n_users):
        group = rng.randrange(10)
        for k in range(6):
            item = f"g{group}-{rng.randrange(6)}"
            ts = t0 + u * 600.0 + k * 30.0
            out.append(EventWrite(f"s{u}", item, k % 2, ts, f"s{u}-{k}"))
    return out


async def damage_shards(aredis: Redis, shards: set[int]) -> dict[int, bytes]:
    """Make item shards refuse every write (a row string that is not whole rows,
    which both item scripts check before writing); their row strings, to
    ``repair_shards`` with."""
    saved = {}
    for shard in shards:
        state = keys.shard_keys(shard)[2]
        saved[shard] = await aredis.get(state) or b""
        await aredis.append(state, b"x")
    return saved


async def repair_shards(aredis: Redis, saved: dict[int, bytes]) -> None:
    for shard, rows in saved.items():
        await aredis.set(keys.shard_keys(shard)[2], rows)


async def test_co_visits_survive_an_item_side_call_that_failed(aredis: Redis) -> None:
    """The user side applied (and recorded the event ids), the item side failed
    in some shards: a retry is a duplicate for the user, yet those shards get
    every pair, and the others count nothing twice. Shards refuse the first
    attempt for real: a partner's shard is only written in the item step, so
    an event whose own shard is sound gets its user side and part of its item
    side applied."""
    store = FeatureStore(aredis, store_settings(user_ttl_days=0))
    writes = _session_writes(30, seed=3, t0=1_790_000_000.0)
    ids = sorted({w.item_id for w in writes})
    await store.upsert_items([(i, "", 0.0) for i in ids])
    replay = Replay()
    for i in ids:
        replay.items.upsert_item(i, "", 0.0)
    # Each user's first three events land whole; then some shards break, and
    # the last three, which pair with the first, are cut off there.
    early = [w for w in writes if int(w.event_id.rsplit("-", 1)[1]) < 3]
    late = [w for w in writes if w not in early]
    assert all(await store.apply_events(early))
    broken = {shard_of(i) for i in ids[::3]}
    saved = await damage_shards(aredis, broken)
    with pytest.raises(ItemWriteFailed) as info:
        await store.apply_events(late)
    first = info.value.results
    sound = [shard_of(w.item_id) not in broken for w in late]
    cut = [k for k, r in enumerate(first) if r is None and sound[k]]
    assert len(cut) > 5  # user side applied, item side cut off in a partner's shard
    await repair_shards(aredis, saved)
    again = await store.apply_events(late)
    # Retried: a duplicate where the user side had applied, fresh where not.
    assert [again[k] for k, r in enumerate(first) if r is None] == [
        0 if sound[k] else 1 for k, r in enumerate(first) if r is None
    ]

    for w in writes:
        replay.apply(w.ts, w.user_id, w.item_id, w.type)
    table = await store.item_table()
    assert table.ids == replay.items.ids
    assert neighbour_counts(table.raw).sum() > 50
    # The events reached the user side in another order: equal up to rounding.
    np.testing.assert_allclose(canonical(table.raw), canonical(replay.items.raw), rtol=1e-12)
    # And another attempt changes nothing on either side.
    assert await store.apply_events(writes) == [0] * len(writes)
    np.testing.assert_array_equal((await store.item_table()).raw, table.raw)


async def test_a_delta_read_patches_the_table_exactly(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([(f"c{k}", f"cat{k % 3}", 1.0 + k) for k in range(50)])
    writes = _session_writes(20, seed=5, t0=1_790_000_000.0)
    await store.apply_events(writes[:60])
    table, first = await store.load_items(shards_per_read=7)
    assert all(s.positions is None for s in first.shards)  # everything, the first time
    cursors = [s.cursor() for s in first.shards]
    await store.apply_events(writes[60:])  # new items, new co-visits, new categories
    await store.upsert_items([("c3", "cat-new", 9.5)])
    delta = await store.read_items(cursors, len(table.categories))
    assert not delta.rebuilt(cursors)
    touched = [s for s in delta.shards if not s.same]
    assert 0 < len(touched) < len(delta.shards)
    # Only what changed from the shards it held (a shard's first items come whole).
    held = zip(delta.shards, cursors, strict=True)
    assert all(s.positions is not None for s, c in held if c.epoch)
    assert sum(len(s.positions) for s in touched if s.positions is not None) < table.count
    table.reserve(rows_needed(table, delta))
    patch_table(table, delta)
    full = await store.item_table()
    assert table.ids == full.ids and table.categories == full.categories
    assert table.count == full.count and table.index == full.index
    np.testing.assert_array_equal(table.raw, full.raw)
    np.testing.assert_array_equal(table.present, full.present)
    # Nothing changed since: every shard answers 'same'.
    cursors = [s.cursor() for s in delta.shards]
    none = await store.read_items(cursors, len(table.categories))
    assert all(s.same for s in none.shards) and none.new_categories == []
    assert none.version == delta.version and none.epoch == delta.epoch
    # Another epoch (a shard rebuilt): that shard sends everything, from the first id.
    shard = next(s.shard for s in touched)
    cursors[shard] = ShardCursor("other", cursors[shard].version, cursors[shard].known)
    rebuilt = await store.read_items(cursors, len(table.categories))
    assert rebuilt.rebuilt(cursors)
    again = rebuilt.shards[shard]
    assert again.positions is None and again.first == 0
    assert again.new_ids == [i for i in full.ids[shard::N_SHARDS] if i]


async def test_a_users_co_visit_buckets_expire_and_stay_bounded(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    t0 = 1_790_000_000.0
    writes = [
        EventWrite("walker", f"w{k}", 0, t0 + k * COVISIT_BUCKET_SECS, f"w{k}") for k in range(100)
    ]
    await store.apply_events(writes)
    buckets = await aredis.zrange(keys.user_visits("walker"), 0, -1, withscores=True)
    # One item per hour for 100 hours: only the last COVISIT_KEEP_SECS are kept.
    assert 40 <= len(buckets) <= 49
    assert await aredis.ttl(keys.user_visits("walker")) > 0


async def test_an_empty_redis_is_claimed_for_this_storage_format(aredis: Redis) -> None:
    store = FeatureStore(aredis, store_settings())
    await store.check_format()
    assert int(await aredis.get(keys.FORMAT_KEY)) == STORAGE_FORMAT
    await store.check_format()  # and accepted from then on


@pytest.mark.parametrize("marker", [None, b"7"])
async def test_data_in_another_storage_format_is_refused(
    aredis: Redis, marker: bytes | None
) -> None:
    """Item rows of another width would be misread, not fail: refuse at start, and
    the item refresh refuses to read them too."""
    await aredis.rpush(keys.LEGACY_ITEM_IDS, "old-item")
    await aredis.set(f"{keys.ITEM_TAG}:state", b"\0" * 8 * 16)  # a format-1 row
    if marker is not None:
        await aredis.set(keys.FORMAT_KEY, marker)
        await aredis.hset(keys.shard_keys(0)[3], "format", marker)
    store = FeatureStore(aredis, store_settings())
    with pytest.raises(IncompatibleStore) as info:
        await store.check_format()
    assert info.value.found == (7 if marker else 1)
    assert "recsvc seed" in str(info.value)
    if marker is not None:
        with pytest.raises(ResponseError, match="storage format 7"):
            await store.read_items(fresh_cursors())
