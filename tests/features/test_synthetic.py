"""The synthetic shop: deterministic, complete, with learnable tastes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from features.events import EventType
from features.logs import read_catalogue, read_events, write_catalogue, write_events
from features.synthetic import SyntheticConfig, generate

CONFIG = SyntheticConfig(n_users=300, n_items=200, n_events=12_000, n_categories=10, seed=11)


def test_same_seed_same_data() -> None:
    a, b = generate(CONFIG, 1e9), generate(CONFIG, 1e9)
    np.testing.assert_array_equal(a.events.ts, b.events.ts)
    np.testing.assert_array_equal(a.events.item, b.events.item)
    c = generate(dataclasses.replace(CONFIG, seed=12), 1e9)
    assert not np.array_equal(a.events.item[:500], c.events.item[:500])


def test_shape_ids_and_order() -> None:
    data = generate(CONFIG, 1e9)
    log = data.events
    assert abs(len(log) - CONFIG.n_events) < 0.1 * CONFIG.n_events
    assert np.all(np.diff(log.ts) >= 0) and log.ts[-1] <= 1e9
    assert len(np.unique(log.user)) == CONFIG.n_users  # every user has an event
    assert log.user_ids[:2] == ["u0", "u1"] and data.catalogue.item_ids[:2] == ["i0", "i1"]
    assert set(np.unique(log.type)) == {int(t) for t in EventType}
    assert (data.catalogue.prices > 0).all()


def test_users_stick_to_their_categories() -> None:
    data = generate(CONFIG, 1e9)
    cats = np.array([int(c[1:]) for c in data.catalogue.categories])
    ev_cat = cats[data.events.item]
    top_share = []
    for u in range(50):
        mine = ev_cat[data.events.user == u]
        if len(mine) >= 10:
            top_share.append(np.bincount(mine).max() / len(mine))
    # With 10 categories, a taste-free user would have a top share near 0.1-0.2.
    assert np.median(top_share) > 0.35


def test_csv_round_trip(tmp_path: Path) -> None:
    data = generate(CONFIG, 1e9)
    write_events(tmp_path / "e.csv", data.events)
    write_catalogue(tmp_path / "i.csv", data.catalogue)
    log = read_events(tmp_path / "e.csv")
    cat = read_catalogue(tmp_path / "i.csv")
    assert len(log) == len(data.events)
    assert [log.user_ids[u] for u in log.user[:50]] == [
        data.events.user_ids[u] for u in data.events.user[:50]
    ]
    np.testing.assert_allclose(log.ts, data.events.ts, atol=1e-3)
    assert cat.item_ids == data.catalogue.item_ids
