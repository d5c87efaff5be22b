"""The vectorised point-in-time state equals the replay's (features.replay, the
reference), on logs with repeated items, equal timestamps, purchases, bare
items and catalogue items; co-visitation exactly while rows have room."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from features import dataset
from features.dataset import DatasetConfig
from features.events import COVISIT_NEIGHBOURS, PURCHASED_MAX, RECENT_MAX
from features.impressions import ImpressionLog
from features.logs import Catalogue, EventLog
from features.pointintime import PointInTime, Popularity, covisit_pairs
from features.popularity import PopularityIndex
from features.replay import Replay
from features.state import COL_NBR, COL_NBR_REF, COL_NBR_SCORE, ItemTable, UserState
from tests.helpers import impressions_for

REL = 1e-9


def _log(
    n: int,
    n_users: int,
    n_items: int,
    seed: int,
    span: float = 20 * 86400.0,
    heavy: bool = False,
) -> EventLog:
    """Events with many repeats (a user's favourite items), runs of equal times,
    and every type; ``heavy``: one user with far more events than RECENT_MAX and
    PURCHASED_MAX allow to keep."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.uniform(1.7e9, 1.7e9 + span, n))
    ts[1::7] = ts[0::7][: len(ts[1::7])]  # equal timestamps
    ts = np.sort(np.round(ts, 1))
    user = rng.integers(0, n_users, n)
    if heavy:
        user[rng.random(n) < 0.3] = 0
    fav = rng.integers(0, n_items, (n_users, 4))
    item = np.where(
        rng.random(n) < 0.5, fav[user, rng.integers(0, 4, n)], rng.integers(0, n_items, n)
    )
    kind = rng.choice(4, n, p=[0.6, 0.2, 0.1, 0.1])
    if heavy:
        kind[(user == 0) & (rng.random(n) < 0.5)] = 3
    return EventLog(
        ts=ts,
        user=user.astype(np.int32),
        item=item.astype(np.int32),
        type=kind.astype(np.int8),
        user_ids=[f"u{k}" for k in range(n_users)],
        item_ids=[f"i{k:04d}" for k in range(n_items)],
    )


def _catalogue(n_items: int, seed: int) -> Catalogue:
    """Half the items, in another order than the log's codes, some without price."""
    rng = np.random.default_rng(seed)
    listed = rng.permutation(n_items)[: n_items // 2]
    prices = np.round(rng.uniform(1, 100, len(listed)), 2)
    prices[::5] = 0.0
    return Catalogue(
        item_ids=[f"i{k:04d}" for k in listed.tolist()],
        categories=[f"c{k % 7}" if k % 9 else "" for k in listed.tolist()],
        prices=prices,
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b)) or abs(a - b) < 1e-300


def _same_user(want: UserState, got: UserState) -> None:
    assert got.n_events == want.n_events
    assert got.ref == want.ref and got.last_ts == want.last_ts
    assert got.last_purchase_ts == want.last_purchase_ts
    assert got.price_n == want.price_n and _close(got.price_sum, want.price_sum)
    assert all(_close(a, b) for a, b in zip(want.counts, got.counts, strict=True))
    assert got.category_affinity.keys() == want.category_affinity.keys()
    for c, v in want.category_affinity.items():
        assert _close(v, got.category_affinity[c]), c
    assert got.recent == want.recent
    assert got.purchased == want.purchased


def _neighbours(table: ItemTable, row: int) -> dict[int, float]:
    r = table.raw[row]
    keys = r[COL_NBR : COL_NBR + COVISIT_NEIGHBOURS].astype(int)
    scores = r[COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
    return {int(k): float(s) for k, s in zip(keys, scores, strict=True) if k}


def _compare(log: EventLog, catalogue: Catalogue | None, ks: np.ndarray) -> dict[str, int]:
    """Replay and point-in-time side by side at every ``k``; counts what was compared."""
    replay = Replay(catalogue)
    pit = PointInTime(log, catalogue)
    ranking = Popularity(pit.items)
    seen = {"users": 0, "unknown": 0, "full_rows": 0, "rows": 0}
    done = 0
    rows = list(log.rows())
    touched: dict[str, set[str]] = {}
    for k, user, was_touched in pit.before_each(ks):
        while done < k:
            ts, u, i, t = rows[done]
            replay.apply(ts, u, i, t)
            touched.setdefault(u, set()).add(i)
            done += 1
        _, user_id, item_id, _ = rows[k]
        want = replay.users.get(user_id)
        if want is None:
            assert user is None
            seen["unknown"] += 1
        else:
            assert user is not None
            _same_user(want, user)
            seen["users"] += 1
        assert was_touched == (item_id in touched.get(user_id, set()))
        a, b = replay.items, pit.table
        # The followed ranking's lists are a rebuild's.
        want_pop, got_pop = PopularityIndex.build(a, rows[k][0]), ranking.index(rows[k][0])
        assert np.array_equal(want_pop.top, got_pop.top)
        assert np.array_equal(want_pop.month_top, got_pop.month_top)
        assert all(map(np.array_equal, want_pop.by_category, got_pop.by_category))
        assert a.n == b.n and a.ids == b.ids and a.index == b.index
        assert np.array_equal(a.present, b.present)
        assert a.categories == b.categories
        np.testing.assert_allclose(b.raw[:, :COL_NBR_REF], a.raw[:, :COL_NBR_REF], rtol=REL)
        present = np.flatnonzero(a.present)
        # The table folds whole hours; a view adds the current hour's co-visits.
        with pit.items.neighbours_view(present):
            for row in present.tolist():
                want_nb, got_nb = _neighbours(a, row), _neighbours(b, row)
                if len(want_nb) < COVISIT_NEIGHBOURS:
                    # Exact while the row has room: the same neighbours, slots and
                    # sums to the bit (hour buckets make ties common).
                    assert list(want_nb.items()) == list(got_nb.items()), row
                    assert a.raw[row, COL_NBR_REF] == b.raw[row, COL_NBR_REF]
                    seen["rows"] += 1
                else:
                    seen["full_rows"] += 1
    return seen


@pytest.mark.parametrize("with_catalogue", [False, True])
def test_states_before_sampled_events_equal_the_replay(with_catalogue: bool) -> None:
    log = _log(6000, 60, 300, seed=3)
    catalogue = _catalogue(300, seed=4) if with_catalogue else None
    ks = np.sort(np.random.default_rng(5).choice(len(log), 150, replace=False))
    ks = np.unique(np.concatenate([[0, 1, len(log) - 1], ks]))
    seen = _compare(log, catalogue, ks)
    assert seen["users"] > 100 and seen["unknown"] >= 1
    assert seen["rows"] > 1000


def test_trimmed_recent_and_purchased_sets_equal_the_replay() -> None:
    """One user with thousands of events and purchases: the kept newest items
    (ties by id at equal times) are the replay's."""
    log = _log(8000, 20, 2000, seed=11, heavy=True)
    heavy = np.flatnonzero(log.user == 0)
    ks = heavy[[len(heavy) // 2, -1]]
    replay = Replay()
    for ts, u, i, t in list(log.rows())[: int(ks[-1])]:
        replay.apply(ts, u, i, t)
    assert len(replay.users["u0"].recent) == RECENT_MAX
    assert len(replay.users["u0"].purchased) == PURCHASED_MAX
    _compare(log, None, ks)


def test_co_visitation_rows_equal_the_replay_below_the_cap() -> None:
    """Bursts within an hour (buckets fill past COVISIT_BUCKET_ITEMS) over few items
    per user: rows stay below the cap and equal the replay's exactly."""
    rng = np.random.default_rng(8)
    n, n_users = 5000, 200
    ts = np.sort(
        1.7e9 + np.repeat(rng.uniform(0, 10 * 86400, n // 25), 25) + rng.uniform(0, 600, n)
    )
    user = np.repeat(rng.integers(0, n_users, n // 25), 25)
    own = rng.integers(0, 3000, (n_users, 30))
    item = own[user, rng.integers(0, 30, n)]
    log = EventLog(
        ts=np.sort(ts),
        user=user.astype(np.int32),
        item=item.astype(np.int32),
        type=np.zeros(n, np.int8),
        user_ids=[f"u{k}" for k in range(n_users)],
        item_ids=[f"i{k}" for k in range(3000)],
    )
    seen = _compare(log, None, np.asarray([n // 3, n // 2, n - 1]))
    assert seen["rows"] > 500


def test_pairs_are_the_first_distinct_items_of_each_bucket_in_order() -> None:
    ts = np.asarray([0.0, 1.0, 2.0, 3.0, 4.0, 3700.0]) + 3600.0 * 1000
    user = np.asarray([0, 0, 1, 0, 0, 0])
    rows = np.asarray([5, 3, 5, 5, 9, 3])
    k, target, neighbour, _ = covisit_pairs(ts, user, rows, 100)
    # Event 1 (row 3) pairs with 5; event 4 (row 9) with 3 and 5, in row order;
    # event 3 repeats 5 (nothing); event 5 is in the next bucket (alone).
    got = list(zip(k.tolist(), target.tolist(), neighbour.tolist(), strict=True))
    assert got == [(101, 3, 5), (101, 5, 3), (104, 9, 3), (104, 3, 9), (104, 9, 5), (104, 5, 9)]


def test_training_and_evaluation_groups_equal_the_replays() -> None:
    """The whole dataset: the same groups, labels, candidates and features (1e-9),
    on a log whose co-visitation rows stay below the cap."""
    log = _log(20000, 300, 3000, seed=3)
    catalogue = _catalogue(3000, seed=4)
    config = DatasetConfig(train_groups=800, eval_groups=200)
    want = dataset.build(log, catalogue, config, reference=True)
    got = dataset.build(log, catalogue, config)
    assert got.train.sizes == want.train.sizes and len(want.train.sizes) > 500
    assert np.array_equal(got.train.label_vector(), want.train.label_vector())
    np.testing.assert_allclose(got.train.matrix(), want.train.matrix(), rtol=REL, equal_nan=True)
    assert (got.n_users, got.n_items) == (want.n_users, want.n_items)
    assert len(got.test.groups) == len(want.test.groups) > 150
    for a, b in zip(want.test.groups, got.test.groups, strict=True):
        assert np.array_equal(a.candidates, b.candidates)
        assert np.array_equal(a.sources, b.sources)
        np.testing.assert_allclose(b.matrix, a.matrix, rtol=REL, equal_nan=True)
        assert a.positive == b.positive and a.touched_before == b.touched_before
        assert a.found_by == b.found_by
        for name, listed in a.baselines.items():
            assert np.array_equal(listed, b.baselines[name]), name


def test_impression_groups_equal_the_replays() -> None:
    """Logged impressions (training and held out, some of users the log never saw)
    get the replay's state just before them: the same groups and features."""
    log = _log(20000, 300, 3000, seed=5)
    catalogue = _catalogue(3000, seed=6)
    clicks = np.flatnonzero(log.type == 1)
    logged = impressions_for(log, clicks[:: max(1, len(clicks) // 300)].tolist(), seed=1)
    strangers = impressions_for(log, clicks[1::97].tolist(), seed=2, prefix="s")
    stranger = [replace(imp, user_id="nobody") for imp in strangers.impressions]
    logged = ImpressionLog(
        sorted([*logged.impressions, *stranger], key=lambda imp: imp.ts),
        [*logged.outcomes, *strangers.outcomes],
    )
    config = DatasetConfig(train_groups=300, eval_groups=100)
    want = dataset.build(log, catalogue, config, impressions=logged, reference=True)
    got = dataset.build(log, catalogue, config, impressions=logged)
    assert want.train.from_impressions > 100 and got.train.sizes == want.train.sizes
    assert got.train.from_impressions == want.train.from_impressions
    np.testing.assert_allclose(got.train.matrix(), want.train.matrix(), rtol=REL, equal_nan=True)
    assert np.array_equal(got.train.position_vector(), want.train.position_vector())
    assert got.impressions is not None and want.impressions is not None
    assert got.impressions.summary() == want.impressions.summary()
    assert want.impressions.summary()["dropped_unknown_user"] > 0
    assert got.impression_test is not None and want.impression_test is not None
    assert len(got.impression_test.groups) == len(want.impression_test.groups) > 20


def test_a_log_held_by_one_user_is_replayed_instead() -> None:
    """Folding every sample's history from scratch is quadratic in a user's share
    of the log: when the samples' histories hold more than REPLAY_FACTOR times
    the log, build() replays it (and says so) instead."""
    rng = np.random.default_rng(4)
    n = 4000
    log = EventLog(
        ts=np.sort(rng.uniform(1.7e9, 1.7e9 + 86400 * 5, n)),
        user=np.where(rng.random(n) < 0.95, 0, rng.integers(1, 50, n)).astype(np.int32),
        item=rng.integers(0, 400, n).astype(np.int32),
        type=np.zeros(n, np.int8),
        user_ids=[f"u{k}" for k in range(50)],
        item_ids=[f"i{k}" for k in range(400)],
    )
    config = DatasetConfig(train_groups=1500, eval_groups=100)
    stages: list[str] = []
    got = dataset.build(log, None, config, stage=stages.append)
    assert any(s.startswith("replay (") for s in stages), stages
    want = dataset.build(log, None, config, reference=True)
    np.testing.assert_array_equal(got.train.matrix(), want.train.matrix())
    quiet: list[str] = []
    dataset.build(log, None, DatasetConfig(train_groups=5, eval_groups=5), stage=quiet.append)
    assert not any(s.startswith("replay (") for s in quiet), quiet


def test_a_ranking_asked_rarely_holds_bounded_changes_and_the_rebuilds_lists() -> None:
    log = _log(6000, 60, 300, seed=9)
    pit = PointInTime(log, _catalogue(300, seed=9))
    often, rarely = Popularity(pit.items), Popularity(pit.items)
    rarely.index(log.ts[0])
    for k in range(100, len(log), 100):
        pit.items.advance(k)
        often.index(log.ts[k])
        # As many changed rows as a long log would leave pending.
        rarely.changed(np.tile(np.flatnonzero(pit.table.present), 300))
        assert rarely._held <= 4 * (1 << 16) + pit.table.n
    want = PopularityIndex.build(pit.table, log.ts[-1])
    got = rarely.index(log.ts[-1])
    assert np.array_equal(want.top, got.top) and np.array_equal(want.month_top, got.month_top)
    assert all(map(np.array_equal, want.by_category, got.by_category))
