"""Popularity lists: ranked by a time-invariant key, kept current incrementally."""

from __future__ import annotations

import numpy as np

from features.events import EventType
from features.popularity import (
    MONTH_HALF_LIFE_INDEX,
    PopularityIndex,
    PopularityRanking,
    popularity_scores,
)
from features.state import ItemTable

T0 = 1_790_000_000.0


def _shop(rng: np.random.Generator, n: int = 400) -> ItemTable:
    table = ItemTable()
    for k in range(n):
        table.upsert_item(f"i{k}", f"c{k % 12}", 1.0 + k % 7)
    for _ in range(1500):
        row = table.index[f"i{rng.integers(0, n)}"]
        table.apply_event(row, int(rng.integers(0, 4)), T0 + rng.uniform(-30, 0) * 86400)
    return table


def _same(a: PopularityIndex, b: PopularityIndex) -> None:
    np.testing.assert_array_equal(a.top, b.top)
    np.testing.assert_array_equal(a.month_top, b.month_top)
    assert len(a.by_category) == len(b.by_category)
    for x, y in zip(a.by_category, b.by_category, strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_key_order_is_the_order_of_the_scores_at_any_later_time() -> None:
    table = _shop(np.random.default_rng(1))
    for now in (T0, T0 + 86400.0, T0 + 90 * 86400.0):
        index = PopularityIndex.build(table, now, top_k=50)
        for half_life, top in ((1, index.top), (MONTH_HALF_LIFE_INDEX, index.month_top)):
            scores = popularity_scores(table, now, half_life)
            scores[~table.present] = -np.inf
            want = np.argsort(-scores, kind="stable")[:50]
            np.testing.assert_array_equal(top, want)
        # Within a category too, and never an empty row.
        cat = table.category
        for c, ranked in enumerate(index.by_category):
            assert (cat[ranked] == c).all() and table.present[ranked].all()
            s = popularity_scores(table, now)[ranked]
            assert (np.diff(s) <= 0).all()


def test_an_updated_ranking_equals_one_built_from_scratch() -> None:
    """Events (raising keys), new items (in new and old categories, and none),
    and items moving between categories: after every step the incremental lists
    equal a full rebuild, with a small top_k so lists overflow and lose members."""
    rng = np.random.default_rng(2)
    table = _shop(rng, 300)
    ranking = PopularityRanking(table, top_k=15)
    moved = 0
    for step in range(60):
        changed = []
        for _ in range(int(rng.integers(1, 30))):
            item = f"i{rng.integers(0, 420)}"  # past 300: new items, no category
            row = table.ensure_item(item)
            ts = T0 + step * 3600.0 + rng.uniform(-40, 1) * 86400  # late ones too
            table.apply_event(row, int(rng.integers(0, 4)), ts)
            changed.append(row)
        if step % 4 == 0:  # a catalogue change: another (sometimes new) category
            row = table.upsert_item(f"i{rng.integers(0, 300)}", f"c{rng.integers(0, 14)}", 3.0)
            changed.append(row)
            moved += 1
        if step % 7 == 0:
            changed.append(table.upsert_item(f"new{step}", "c-late", 1.0))
        ranking.update(table, np.asarray(changed))
        _same(ranking.index(T0), PopularityRanking(table, top_k=15).index(T0))
    assert moved >= 15 and len(table.categories) > 12


def test_an_update_with_nothing_changed_keeps_the_lists() -> None:
    table = _shop(np.random.default_rng(3))
    ranking = PopularityRanking(table)
    before = ranking.index(T0)
    ranking.update(table, np.zeros(0, np.int64))
    _same(before, ranking.index(T0))
    assert ranking.index(T0).top is before.top


def test_a_purchase_burst_moves_an_item_to_the_top() -> None:
    table = _shop(np.random.default_rng(4))
    ranking = PopularityRanking(table)
    row = table.index["i7"]
    for k in range(200):
        table.apply_event(row, EventType.PURCHASE, T0 + k)
    ranking.update(table, np.asarray([row]))
    assert ranking.index(T0).top[0] == row
