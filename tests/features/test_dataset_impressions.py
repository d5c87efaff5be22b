"""Training groups from logged impressions, built inside the one replay of the log."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from features.candidates import retrieve
from features.dataset import (
    NOT_SHOWN,
    Dataset,
    DatasetConfig,
    _sample,
    build,
    learn_table,
    split_log,
)
from features.events import EventType
from features.impressions import Impression, ImpressionLog, Outcome
from features.item2item import LearnConfig
from features.neighbours import Bound
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import build_matrix
from features.synthetic import SyntheticData
from tests.helpers import click_events, impressions_for

CONFIG = DatasetConfig(train_groups=200, eval_groups=100, seed=3)


def _joined(*logs: ImpressionLog) -> ImpressionLog:
    out = ImpressionLog(
        [i for log in logs for i in log.impressions], [o for log in logs for o in log.outcomes]
    )
    out.impressions.sort(key=lambda imp: imp.ts)
    return out


def _groups(data: Dataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features, labels, positions) of each training group, in order."""
    t = data.train
    return list(zip(t.features, t.labels, t.positions, strict=True))


def test_an_impression_group_holds_the_rows_the_replay_builds_for_its_items(
    small_data: SyntheticData,
) -> None:
    log = small_data.events
    split = split_log(log, CONFIG.holdout)
    logged = impressions_for(log, click_events(log, split.n_train // 2, split.n_train, 1))
    [imp] = logged.impressions
    table = learn_table(log, split, LearnConfig())
    config = replace(CONFIG, train_groups=0, eval_groups=0)
    # The replay's build (the vectorised one equals it below the co-visitation
    # caps: tests/features/test_pointintime.py; this log's busy items pass them).
    data = build(
        log, small_data.catalogue, config, neighbours=table, impressions=logged, reference=True
    )
    [(rows, labels, positions)] = _groups(data)
    # The reference: an independent replay, stopped at the first event not before
    # the impression, building the rows for the shown items as serving would.
    expected: list[np.ndarray] = []
    replay = Replay(small_data.catalogue)

    def before(k: int, ts: float, user_id: str, item_id: str, event_type: int) -> None:
        if ts < imp.ts or expected:
            return
        user, items = replay.users[imp.user_id], replay.items
        found = retrieve(
            user,
            items,
            PopularityIndex.build(items, imp.ts),
            data.config.candidates,
            np.zeros(0, np.int64),
            imp.ts,
            Bound(table, table.bind(items)),
        )
        idx = np.asarray([items.index[i] for i in imp.items])
        expected.append(build_matrix(user, items, idx, imp.ts, retrieval=found))

    replay.run(log, before=before)
    np.testing.assert_array_equal(rows, expected[0])
    assert list(positions) == list(range(1, 11))
    [clicked] = logged.outcomes
    assert labels.tolist() == [2.0 if i == clicked.item_id else 0.0 for i in imp.items]
    assert data.train.from_impressions == 1 and data.train.from_sampled == 0


def test_shown_items_are_graded_by_their_users_outcomes_and_keep_their_positions(
    small_data: SyntheticData,
) -> None:
    log = small_data.events
    ts = float(log.ts[len(log) // 2])
    u, other = log.user_ids[int(log.user[0])], log.user_ids[int(log.user[1])]
    a, b, c = log.item_ids[:3]
    logged = ImpressionLog(
        [
            Impression("r1", u, ts, (a, "never-seen", b, c)),
            Impression("r2", u, ts + 1, (a, b)),  # outcomes of another user only
            Impression("r3", "nobody", ts + 2, (a, b)),  # a user the replay never saw
        ],
        [
            Outcome("r1", u, b, EventType.VIEW, ts + 5),
            Outcome("r1", u, b, EventType.PURCHASE, ts + 60),
            Outcome("r1", u, a, EventType.CLICK, ts + 4000),  # after the window
            Outcome("r1", other, c, EventType.CLICK, ts + 5),
            Outcome("r2", other, a, EventType.CLICK, ts + 5),
            Outcome("r3", "nobody", a, EventType.CLICK, ts + 5),
        ],
    )
    config = replace(CONFIG, train_groups=0, eval_groups=0, label_window=3600.0)
    data = build(log, small_data.catalogue, config, impressions=logged)
    [(_, labels, positions)] = _groups(data)
    assert labels.tolist() == [0.0, 4.0, 0.0]  # a, b, c: the unknown item left out
    assert positions.tolist() == [1, 3, 4]
    assert data.impressions is not None
    summary = data.impressions.summary()
    assert summary["train_groups"] == 1
    assert summary["shown_items_unknown"] == 1
    assert summary["dropped_no_positive"] == 1  # r2
    assert summary["dropped_unknown_user"] == 1  # r3
    assert summary["labels"]["ignored_user_mismatch"] == 2
    assert summary["labels"]["ignored_outside_window"] == 1
    vector = data.train.position_vector()
    assert vector is not None and vector.dtype == np.int32 and vector.tolist() == [1, 3, 4]


def test_a_sampled_event_that_is_an_impressions_outcome_makes_no_group_of_its_own(
    small_data: SyntheticData,
) -> None:
    log = small_data.events
    split = split_log(log, CONFIG.holdout)
    # The training events the dataset samples (its own stream), and clicks among them.
    picked = _sample(np.random.default_rng([CONFIG.seed, 0]), 0, split.n_train, 200)
    clicks = [int(k) for k in picked if log.type[k] == EventType.CLICK][:20]
    assert len(clicks) >= 5
    logged = impressions_for(log, clicks, lead_secs=0.5)
    data = build(log, small_data.catalogue, CONFIG, impressions=logged)
    t = data.train
    assert t.skipped_impression_outcome == len(clicks)
    assert t.from_impressions == len(clicks)
    assert t.from_sampled + t.skipped_not_retrieved + t.skipped_unknown_user + len(clicks) == 200
    # The sampled groups' rows say "not shown"; the impression groups' say where.
    for _, labels, positions in _groups(data):
        if (positions == NOT_SHOWN).all():
            assert labels[0] > 0 and not labels[1:].any()
        else:
            assert (positions >= 1).all() and labels.max() == 2.0
    # Without the impressions, the same sampled events: those clicks make groups
    # (or are skipped for the usual reasons) again, and nothing else changes.
    w = build(log, small_data.catalogue, CONFIG).train
    assert w.position_vector() is None and w.skipped_impression_outcome == 0
    usual = w.skipped_not_retrieved + w.skipped_unknown_user
    usual_with = t.skipped_not_retrieved + t.skipped_unknown_user
    assert w.from_sampled - t.from_sampled == len(clicks) - (usual - usual_with)
    assert w.from_sampled > t.from_sampled


def test_held_out_impressions_are_never_trained_on(small_data: SyntheticData) -> None:
    log = small_data.events
    split = split_log(log, CONFIG.holdout)
    before = impressions_for(log, click_events(log, 0, split.n_train, 40, seed=1), seed=1)
    after = impressions_for(
        log, click_events(log, split.n_train, len(log), 60, seed=2), seed=2, prefix="h"
    )
    trained = build(log, small_data.catalogue, CONFIG, impressions=before)
    both = build(log, small_data.catalogue, CONFIG, impressions=_joined(before, after))
    for (x1, y1, p1), (x2, y2, p2) in zip(_groups(trained), _groups(both), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(p1, p2)
    assert both.train.from_impressions == trained.train.from_impressions == 40
    # The held-out ones are evaluation groups, and the next-event groups did not move.
    assert trained.impression_test is not None and not trained.impression_test.groups
    assert both.impression_test is not None and both.impression_test.held_out == 60
    assert len(both.impression_test.groups) == 60
    for g1, g2 in zip(trained.test.groups, both.test.groups, strict=True):
        np.testing.assert_array_equal(g1.matrix, g2.matrix)
    assert both.impressions is not None and both.impressions.summary()["held_out_impressions"] == 60


def test_without_impressions_the_sampled_groups_are_what_they_were(
    small_data: SyntheticData,
) -> None:
    plain = build(small_data.events, small_data.catalogue, CONFIG)
    empty = build(
        small_data.events, small_data.catalogue, CONFIG, impressions=ImpressionLog([], [])
    )
    np.testing.assert_array_equal(plain.train.matrix(), empty.train.matrix())
    np.testing.assert_array_equal(plain.train.label_vector(), empty.train.label_vector())
    assert plain.train.sizes == empty.train.sizes
    assert empty.train.position_vector() is None
