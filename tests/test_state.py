"""The pure state-update math: decay, order independence, recent items."""

from __future__ import annotations

import random

import numpy as np
import pytest

from features.events import HALF_LIVES, RECENT_MAX, EventType, counter_index
from features.state import COL_COUNTS, COL_FIRST_SEEN, ItemTable, UserState, apply_user_event

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
    for item in a.ids:
        ra, rb = a.raw[a.index[item]], b.raw[b.index[item]]
        np.testing.assert_allclose(ra[COL_COUNTS:], rb[COL_COUNTS:], rtol=1e-9)
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
    assert s.purchased == {"i9"}
    assert s.last_purchase_ts == T0
    assert s.price_sum / s.price_n == 12.0
