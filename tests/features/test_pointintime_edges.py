"""The point-in-time state at its edges: a user with most of the log, windows and
batches cut small, bucket edges, logs of months, samples that must not move
the state, and rows past the co-visitation cap (sane and deterministic)."""

from __future__ import annotations

import copy
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from features import dataset, pointintime
from features.dataset import DatasetConfig
from features.events import COVISIT_BUCKET_SECS, COVISIT_NEIGHBOURS, N_HALF_LIVES
from features.impressions import ImpressionLog
from features.logs import EventLog
from features.pointintime import PointInTime
from features.replay import Replay
from features.state import COL_COUNTS, COL_NBR, COL_NBR_SCORE, UserState
from tests.features.test_pointintime import _catalogue, _compare, _log, _same_user
from tests.helpers import impressions_for

MB = 1 << 20


def _bot_log(n_bot: int, n_other: int, n_items: int, seed: int) -> EventLog:
    """User 0 makes ``n_bot`` events, nine others ``n_other`` between them."""
    rng = np.random.default_rng(seed)
    n = n_bot + n_other
    user = np.zeros(n, np.int32)
    user[rng.choice(n, n_other, replace=False)] = rng.integers(1, 10, n_other)
    return EventLog(
        ts=np.sort(np.round(1.7e9 + rng.uniform(0, 30 * 86400, n))),
        user=user,
        item=rng.integers(0, n_items, n).astype(np.int32),
        type=rng.choice(4, n, p=[0.5, 0.2, 0.1, 0.2]).astype(np.int8),
        user_ids=[f"u{k}" for k in range(10)],
        item_ids=[f"i{k:04d}" for k in range(n_items)],
    )


def test_a_heavy_users_samples_are_folded_in_bounded_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Samples are drawn uniformly over events, so a user with most of the log has
    most of a batch's samples, each gathering that user's whole history: a batch
    of samples gathers O(samples x history) events. The gather is bounded by
    GATHER_EVENTS (set small here), whatever one user's share of the log."""
    log = _bot_log(4000, 400, 500, seed=2)
    bot = np.flatnonzero(log.user == 0)
    ks = np.sort(np.random.default_rng(3).choice(bot, 400, replace=False))
    monkeypatch.setattr(pointintime, "GATHER_EVENTS", 20_000, raising=False)
    pit = PointInTime(log)
    tracemalloc.start()
    try:
        states, _ = pit.users.before(ks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 400 samples x ~2000 earlier events each gathered at once took ~130 MB.
    assert peak < 40 * MB, peak / MB
    replay = Replay()
    want: dict[int, UserState | None] = {}
    wanted = set(ks.tolist())
    for k, row in enumerate(log.rows()):
        if k in wanted:
            want[k] = copy.deepcopy(replay.users.get("u0"))
        replay.apply(*row)
    for k, got in zip(ks.tolist(), states, strict=True):
        expected = want[k]
        if expected is None:
            assert got is None
        else:
            assert got is not None
            _same_user(expected, got)


def _edgy_log(n: int, seed: int, span: float) -> EventLog:
    """Runs of equal times on hour-bucket edges and a second either side of them,
    over ``span`` seconds."""
    log = _log(n, 40, 400, seed=seed, span=span)
    rng = np.random.default_rng(seed)
    ts = log.ts.copy()
    edge = np.floor(ts / COVISIT_BUCKET_SECS) * COVISIT_BUCKET_SECS
    pick = rng.random(n)
    ts[pick < 0.2] = edge[pick < 0.2]
    ts[(pick >= 0.2) & (pick < 0.3)] = edge[(pick >= 0.2) & (pick < 0.3)] - 1.0
    return replace(log, ts=np.sort(ts))


@pytest.mark.parametrize("span_days", [3.0, 150.0])
def test_small_windows_and_batches_on_bucket_edges_equal_the_replay(
    monkeypatch: pytest.MonkeyPatch, span_days: float
) -> None:
    """Co-visitation windows of a few dozen events, user batches of 5, a gather
    budget of a few hundred events; equal times on bucket edges; and a log of
    five months (every anchor cell, counters with a 1-hour half-life long gone)."""
    monkeypatch.setattr(pointintime, "WINDOW_EVENTS", 37)
    monkeypatch.setattr(pointintime, "USER_BATCH", 5)
    monkeypatch.setattr(pointintime, "GATHER_EVENTS", 300, raising=False)
    log = _edgy_log(3000, seed=7, span=span_days * 86400.0)
    assert len(np.unique(log.ts)) < len(log) * 0.95
    catalogue = _catalogue(400, seed=8)
    ks = np.sort(np.random.default_rng(9).choice(len(log), 60, replace=False))
    ks = np.unique(np.concatenate([[0, 1, 36, 37, 38, len(log) - 1], ks]))
    seen = _compare(log, catalogue, ks)
    assert seen["users"] > 40 and seen["rows"] > 200


def test_the_state_at_an_event_does_not_depend_on_the_other_samples() -> None:
    """Item rows (counters, co-visits past the cap included) are the same to the
    bit whichever other events were sampled."""
    log = _log(6000, 30, 200, seed=4, span=5 * 86400.0)
    target = len(log) * 3 // 4
    tables = []
    for extra in (np.zeros(0, np.int64), np.arange(1, target, 7), np.arange(0, target, 131)):
        pit = PointInTime(log)
        for k, _, _ in pit.before_each(np.unique(np.concatenate([extra, [target]]))):
            if k == target:
                tables.append(pit.table.raw.copy())
    full = np.flatnonzero((tables[0][:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] > 0).all(axis=1))
    assert len(full) > 20  # rows past the cap are compared too
    for other in tables[1:]:
        assert np.array_equal(tables[0], other)


def test_rows_past_the_cap_stay_sane() -> None:
    """Past the cap: distinct neighbours, never the item itself, present rows,
    positive finite scores, and the strongest the replay keeps are kept too."""
    log = _log(6000, 30, 200, seed=4, span=5 * 86400.0)
    pit = PointInTime(log)
    list(pit.before_each(np.asarray([len(log)])))
    replay = Replay()
    for row in log.rows():
        replay.apply(*row)
    raw, present = pit.table.raw, pit.table.present
    full = 0
    for r in np.flatnonzero(present).tolist():
        keys = raw[r, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS].astype(np.int64)
        scores = raw[r, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
        kept = keys[keys > 0]
        assert len(set(kept.tolist())) == len(kept)
        assert r + 1 not in kept and present[kept - 1].all()
        assert np.all(np.isfinite(scores)) and np.all(scores[keys > 0] > 0)
        assert np.all(scores[keys == 0] == 0)
        if len(kept) == COVISIT_NEIGHBOURS:
            full += 1
            # The replay's strongest neighbour (a clear winner) is kept here too.
            want = replay.items.raw[r]
            w_keys = want[COL_NBR : COL_NBR + COVISIT_NEIGHBOURS].astype(np.int64)
            w_scores = want[COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
            top = np.sort(w_scores)[::-1]
            if top[0] > 1.5 * top[1]:
                assert w_keys[np.argmax(w_scores)] in kept
    assert full > 20


def test_held_out_impressions_do_not_move_training_features() -> None:
    """Adding held-out impressions (more points to stop the sweep at, their own
    popularity lists, their users' co-visit views) changes no training group."""
    log = _log(12000, 200, 1500, seed=12)
    clicks = np.flatnonzero(log.type == 1)
    split = int(len(log) * 0.8)
    train_clicks = clicks[clicks < split]
    test_clicks = clicks[clicks >= split]
    base = impressions_for(log, train_clicks[::5].tolist(), seed=1)
    extra = impressions_for(log, test_clicks[::2].tolist(), seed=2, prefix="h")
    both = ImpressionLog(
        sorted([*base.impressions, *extra.impressions], key=lambda imp: imp.ts),
        [*base.outcomes, *extra.outcomes],
    )
    config = DatasetConfig(train_groups=300, eval_groups=100)
    a = dataset.build(log, None, config, impressions=base)
    b = dataset.build(log, None, config, impressions=both)
    assert b.impression_test is not None and len(b.impression_test.groups) > 10
    assert a.train.sizes == b.train.sizes and a.train.from_impressions > 20
    assert np.array_equal(a.train.matrix(), b.train.matrix(), equal_nan=True)
    assert np.array_equal(a.train.label_vector(), b.train.label_vector())


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_logs_and_impressions_outside_the_log(n: int) -> None:
    """One- and two-event logs; states before the first event, after the last, and
    for a user the log never saw."""
    log = EventLog(
        ts=1.7e9 + np.arange(n, dtype=np.float64) * 3600.0,
        user=np.zeros(n, np.int32),
        item=np.arange(n, dtype=np.int32),
        type=np.full(n, 3, np.int8),
        user_ids=["u0", "u1"],
        item_ids=[f"i{k}" for k in range(n)],
    )
    pit = PointInTime(log)
    ks = np.asarray([0, 0, n, n], np.int64)
    who = np.asarray([0, 1, 0, 1], np.int64)
    got = list(pit.before_each(ks, who))
    assert [s is None for _, s, _ in got] == [True, True, False, True]
    after = got[2][1]
    assert after is not None and after.n_events == n and len(after.purchased) == n
    assert pit.table.count == n


def test_a_counter_decayed_over_several_anchor_cells_is_not_lost() -> None:
    """An item bought late in a 16-day anchor cell and seen again 40 days later:
    its 1-hour purchase counter is 2 ** -960 (~1e-289, a normal float), not 0.
    (The running sum, up to 2 ** 384 late in a cell, was moved three cells on by
    a factor 2 ** -1152 that underflows by itself.)"""
    cell = pointintime.ANCHOR_SECS
    t0 = (np.floor(1.7e9 / cell) + 1) * cell + 15.9 * 86400.0
    log = EventLog(
        ts=np.asarray([t0, t0 + 40 * 86400.0]),
        user=np.asarray([0, 1], np.int32),
        item=np.zeros(2, np.int32),
        type=np.asarray([3, 0], np.int8),
        user_ids=["u0", "u1"],
        item_ids=["i0"],
    )
    replay = Replay()
    for row in log.rows():
        replay.apply(*row)
    pit = PointInTime(log)
    list(pit.before_each(np.asarray([len(log)])))
    want = replay.items.raw[replay.items.index["i0"], COL_COUNTS + 3 * N_HALF_LIVES]
    got = pit.table.raw[pit.table.index["i0"], COL_COUNTS + 3 * N_HALF_LIVES]
    assert want == 2.0**-960
    assert got == pytest.approx(want, rel=1e-9, abs=0.0)


def test_duplicates_repeat_purchases_and_catalogue_only_items_equal_the_replay() -> None:
    """Every event twice, one item bought over and over, and a catalogue with items
    and categories the log never mentions (and log items it does not list)."""
    base = _log(1500, 20, 200, seed=21)
    twice = np.repeat(np.arange(len(base)), 2)
    kind = base.type[twice].copy()
    kind[(base.item[twice] == 7)] = 3
    log = replace(base, ts=base.ts[twice], user=base.user[twice], item=base.item[twice], type=kind)
    listed = _catalogue(200, seed=22)
    catalogue = replace(
        listed,
        item_ids=[*listed.item_ids, "only-a", "only-b"],
        categories=[*listed.categories, "nowhere", "c1"],
        prices=np.concatenate([listed.prices, [5.0, 0.0]]),
    )
    ks = np.sort(np.random.default_rng(23).choice(len(log), 80, replace=False))
    ks = np.unique(np.concatenate([[0, 1, 2, len(log) - 1], ks]))
    seen = _compare(log, catalogue, ks)
    assert seen["users"] > 60


def test_progress_adds_up_to_the_log() -> None:
    log = _log(4000, 60, 400, seed=31)
    ticks: list[int] = []
    dataset.build(log, None, DatasetConfig(train_groups=50, eval_groups=20), progress=ticks.append)
    assert sum(ticks) == len(log) and min(ticks) > 0
