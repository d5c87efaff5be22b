"""The pure state-update math: decay, order independence, recent items."""

from __future__ import annotations

import random

import numpy as np
import pytest

from features import covisit
from features.events import (
    COVISIT_BUCKET_ITEMS,
    COVISIT_BUCKET_SECS,
    COVISIT_KEEP_SECS,
    COVISIT_NEIGHBOURS,
    HALF_LIVES,
    PURCHASED_MAX,
    RECENT_MAX,
    EventType,
    counter_index,
)
from features.replay import Replay
from features.state import (
    COL_COUNTS,
    COL_FIRST_SEEN,
    COL_NBR,
    COL_NBR_SCORE,
    ItemTable,
    UserState,
    apply_user_event,
    covisit_bucket,
)
from tests.helpers import canonical, neighbour_counts

T0 = 1_700_000_000.0


def test_counter_decays_by_half_each_half_life() -> None:
    s = UserState()
    apply_user_event(s, EventType.CLICK, T0, "i1", "c1", 10.0)
    apply_user_event(s, EventType.VIEW, T0 + HALF_LIVES[0], "i2", "c1", 10.0)
    assert s.counts[counter_index(EventType.CLICK, 0)] == pytest.approx(0.5)
    assert s.counts[counter_index(EventType.VIEW, 0)] == pytest.approx(1.0)
    assert s.ref == T0 + HALF_LIVES[0]


def _events(n: int, seed: int) -> list[tuple[int, float, str, str, float]]:
    rng = random.Random(seed)
    return [
        (
            rng.randrange(4),
            T0 + rng.uniform(0, 10 * 86400),
            f"i{rng.randrange(40)}",
            f"c{rng.randrange(5)}",
            rng.choice([0.0, 9.5, 20.0]),
        )
        for _ in range(n)
    ]


def test_user_state_does_not_depend_on_arrival_order() -> None:
    events = _events(300, seed=1)
    a, b = UserState(), UserState()
    for e in sorted(events, key=lambda e: e[1]):
        apply_user_event(a, *e)
    shuffled = events[:]
    random.Random(2).shuffle(shuffled)
    for e in shuffled:
        apply_user_event(b, *e)
    assert a.ref == b.ref
    np.testing.assert_allclose(a.counts, b.counts, rtol=1e-9)
    assert a.category_affinity.keys() == b.category_affinity.keys()
    for c in a.category_affinity:
        assert a.category_affinity[c] == pytest.approx(b.category_affinity[c], rel=1e-9)
    assert a.purchased == b.purchased
    assert a.recent == b.recent
    assert (a.last_ts, a.last_purchase_ts, a.n_events, a.price_n) == (
        b.last_ts,
        b.last_purchase_ts,
        b.n_events,
        b.price_n,
    )
    assert a.price_sum == pytest.approx(b.price_sum, rel=1e-12)


def test_item_state_does_not_depend_on_arrival_order() -> None:
    events = _events(300, seed=3)
    a, b = ItemTable(), ItemTable()
    for table, evs in ((a, sorted(events, key=lambda e: e[1])), (b, events)):
        for t, ts, item, cat, price in evs:
            table.apply_event(table.upsert_item(item, cat, price), t, ts)
    for item in a.index:
        ra, rb = a.raw[a.index[item]], b.raw[b.index[item]]
        np.testing.assert_allclose(ra[COL_COUNTS:COL_NBR], rb[COL_COUNTS:COL_NBR], rtol=1e-9)
        assert ra[COL_FIRST_SEEN] == rb[COL_FIRST_SEEN]


def test_recent_items_keep_the_newest_by_event_time() -> None:
    s = UserState()
    for k in range(RECENT_MAX + 5):
        apply_user_event(s, EventType.VIEW, T0 + k, f"i{k}", "", 0.0)
    apply_user_event(s, EventType.VIEW, T0 - 100, "old", "", 0.0)  # late, older event
    newest = [item for item, _ in s.recent_newest_first()]
    assert len(newest) == RECENT_MAX
    assert newest[0] == f"i{RECENT_MAX + 4}"
    assert "old" not in newest and "i0" not in newest


def test_purchase_marks_item_purchased_and_sets_last_purchase() -> None:
    s = UserState()
    apply_user_event(s, EventType.PURCHASE, T0, "i9", "c1", 12.0)
    assert s.purchased == {"i9"} and s.purchase_times == {"i9": T0}
    assert s.last_purchase_ts == T0
    assert s.price_sum / s.price_n == 12.0


def test_purchases_keep_the_newest_whatever_the_arrival_order() -> None:
    """Capped at PURCHASED_MAX, the oldest dropped: the newest purchase time per
    item decides, ties by id, and arrival order does not matter."""
    buys = [(T0 + (k % (PURCHASED_MAX + 30)), f"i{k % (PURCHASED_MAX + 60)}") for k in range(900)]
    newest: dict[str, float] = {}
    for ts, item in buys:
        newest[item] = max(ts, newest.get(item, 0.0))
    kept = sorted(newest.items(), key=lambda kv: (kv[1], kv[0]))[-PURCHASED_MAX:]
    for order in (buys, buys[::-1], random.Random(5).sample(buys, len(buys))):
        s = UserState()
        for ts, item in order:
            apply_user_event(s, EventType.PURCHASE, ts, item, "", 0.0)
        assert s.purchase_times == dict(kept) and s.purchased == set(dict(kept))


def _replay(events: list[tuple[float, str, str, int]]) -> Replay:
    replay = Replay()
    for e in events:
        replay.apply(*e)
    return replay


def _browsing(n_users: int, seed: int) -> list[tuple[float, str, str, int]]:
    rng = random.Random(seed)
    return [
        (T0 + rng.uniform(0, 30 * 3600), f"u{rng.randrange(n_users)}", f"i{rng.randrange(150)}", 0)
        for _ in range(1000)
    ]


def test_co_visitation_does_not_depend_on_arrival_order() -> None:
    """Within the keep window and below the caps, the neighbour lists (which
    items, and their decayed counts) are the same for any arrival order."""
    events = _browsing(100, seed=5)
    in_order = _replay(sorted(events))
    shuffled = events[:]
    random.Random(6).shuffle(shuffled)
    other = _replay(shuffled)
    counts = neighbour_counts(in_order.items.raw)
    assert counts.sum() > 300 and counts.max() < COVISIT_NEIGHBOURS
    a = canonical(in_order.items.raw)
    b = canonical(other.items.raw)
    for item in in_order.items.index:
        ra, rb = a[in_order.items.index[item]], b[other.items.index[item]]
        # Slots hold item indices, which differ between the two tables: compare ids.
        ids_a = {in_order.items.ids[int(k) - 1] for k in ra[COL_NBR:COL_NBR_SCORE] if k}
        ids_b = {other.items.ids[int(k) - 1] for k in rb[COL_NBR:COL_NBR_SCORE] if k}
        assert ids_a == ids_b, item
    for user in {e[1] for e in events}:
        for table in (in_order, other):
            assert table.users[user].visits  # buckets were recorded

    # The scores, per (item, neighbour) by id.
    def scores(r: Replay) -> dict[tuple[str, str], float]:
        out = {}
        for item, i in r.items.index.items():
            idx, sc = covisit.neighbours(r.items, np.array([i]), T0 + 40 * 3600)
            for k, v in zip(idx[0].tolist(), sc[0].tolist(), strict=True):
                if k >= 0:
                    out[(item, r.items.ids[k])] = v
        return out

    sa, sb = scores(in_order), scores(other)
    assert sa.keys() == sb.keys()
    for key, v in sa.items():
        assert sb[key] == pytest.approx(v, rel=1e-9)


def test_a_pair_counts_once_per_bucket_and_only_within_it() -> None:
    s = UserState()
    assert apply_user_event(s, EventType.VIEW, T0, "a", "", 0.0) == []
    assert apply_user_event(s, EventType.VIEW, T0 + 1, "b", "", 0.0) == ["a"]
    # The same items again in the bucket: no new pairs.
    assert apply_user_event(s, EventType.CLICK, T0 + 2, "a", "", 0.0) == []
    assert apply_user_event(s, EventType.VIEW, T0 + 3, "b", "", 0.0) == []
    assert apply_user_event(s, EventType.VIEW, T0 + 4, "c", "", 0.0) == ["a", "b"]
    # Another bucket starts empty.
    later = (covisit_bucket(T0) + 1) * COVISIT_BUCKET_SECS
    assert apply_user_event(s, EventType.VIEW, later, "a", "", 0.0) == []


def test_a_full_bucket_stops_pairing_and_old_buckets_stop_pairing() -> None:
    s = UserState()
    start = covisit_bucket(T0) * COVISIT_BUCKET_SECS
    for k in range(COVISIT_BUCKET_ITEMS):
        assert len(apply_user_event(s, EventType.VIEW, start + k, f"i{k}", "", 0.0)) == k
    assert apply_user_event(s, EventType.VIEW, start + 50, "one-too-many", "", 0.0) == []
    # An event older than the keep window (behind the newest) pairs with nothing.
    apply_user_event(s, EventType.VIEW, start + COVISIT_KEEP_SECS + 10, "new", "", 0.0)
    assert apply_user_event(s, EventType.VIEW, start + 60, "late", "", 0.0) == []
    assert min(s.visits) >= covisit_bucket(start + 10)


def test_a_full_neighbour_row_keeps_its_strongest_neighbours() -> None:
    table = ItemTable()
    hub = table.ensure_item("hub")
    others = [table.ensure_item(f"n{k}") for k in range(COVISIT_NEIGHBOURS + 10)]
    strong = others[:5]
    for rep in range(3):
        table.add_pairs(hub, strong, T0 + rep)
    table.add_pairs(hub, others[5:], T0 + 10)
    idx, _ = covisit.neighbours(table, np.array([hub]), T0 + 10)
    kept = set(idx[0].tolist())
    assert set(strong) <= kept
    assert len(kept) == COVISIT_NEIGHBOURS
    # The pair counts are symmetric: each strong neighbour knows the hub 3 times.
    back_idx, back = covisit.neighbours(table, np.array(strong), T0 + 10)
    assert (back_idx[:, 0] == hub).all()
    np.testing.assert_allclose(back[:, 0], 3.0, rtol=1e-4)  # decayed over seconds


def test_counters_decayed_below_any_meaning_are_exactly_zero_in_the_matrix() -> None:
    """1-hour counters 200 hours on are ~1e-60: zero in the matrix, so LightGBM and
    the compiled scorer cannot disagree at LightGBM's 1e-35 zero threshold."""
    from features.schema import FEATURE_NAMES, build_matrix

    s, table = UserState(), ItemTable()
    i = table.ensure_item("i1")
    apply_user_event(s, EventType.VIEW, T0, "i1", "", 0.0)
    table.apply_event(i, EventType.VIEW, T0)
    m = build_matrix(s, table, np.asarray([i]), T0 + 200 * 3600.0, dtype=np.float64)
    for name in ("u_cnt_view_1h", "i_pop_view_1h"):
        assert m[0, FEATURE_NAMES.index(name)] == 0.0
    assert m[0, FEATURE_NAMES.index("u_cnt_view_7d")] > 0.0
