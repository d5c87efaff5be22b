"""Point-in-time ranking examples and served-list evaluation groups.

The log is split by event count (the last ``holdout`` share of events is held
out, never a share of the time range: a log whose first event lies months
before the rest still trains on 80% of its events) or at a given time. The
learned neighbour table comes from the training events only. Then, with the
pure state as it was just before each sampled event (``features.pointintime``,
equal to walking the whole log through ``features.replay``):

- at sampled training events, the candidates the service would have generated
  just before the event; a group is the labelled item plus negatives sampled
  from those candidates, and only events whose item the sources found make a
  group (the ranker learns to order what serving will give it);
- at sampled held-out events of users with history, everything needed to build
  the lists the service would serve then, and the baselines' lists
  (``features.evaluation`` scores them once the model exists).

Given logged impressions (``features.impressions``), the same pass takes them
in time order between the events: a training impression (before the split)
with a labelled outcome becomes a group of its shown items, with their
features just before it and their served positions; a sampled training event
that is one of its outcomes makes no sampled group of its own. Sampled held-out
impressions with a labelled outcome get what the next-event protocol gets,
plus the shown items (``features.impression_groups`` decides what goes in,
``features.impression_eval`` scores them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from features import evaluation, impression_eval
from features.candidates import (
    SOURCES,
    CandidateConfig,
    Candidates,
    Retrieval,
    assemble,
    quota,
    retrieve,
)
from features.impression_groups import ImpressionStats, Logged
from features.impressions import GRADES, LABEL_WINDOW_SECS, Impression, ImpressionLog
from features.item2item import LearnConfig, learn
from features.logs import Catalogue, EventLog
from features.neighbours import Binding, Bound, NeighbourTable
from features.pointintime import PointInTime, Popularity
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import FEATURE_NAMES, build_matrix
from features.state import ItemTable, UserState

# The offline popularity index is rebuilt at most this often (log seconds) for
# training groups, and for evaluation groups as often as the serving cache.
TRAIN_POPULARITY_SECS = 300.0
EVAL_POPULARITY_SECS = 2.0
# The vectorised state folds each sample's user history from scratch (about
# 0.2 us an event, against ~50 us an event for the replay): past this many
# times the log's events in all samples' histories (a few users with most of
# the log, sampled often), the replay is cheaper. Linear folding (each user
# from its previous sample on) would remove the case.
REPLAY_FACTOR = 100
# Below this share of repeated (user, item) events, a catalogue is one of things
# used once (films, books): recommending what the user already touched is waste.
REPEAT_SHARE_ALLOWS_SEEN = 0.05
# The position id of a sampled-negative group's rows: not shown to anyone.
NOT_SHOWN = 0


class NoTrainingGroups(ValueError):
    """The log cannot give a single training group."""


class SplitError(ValueError):
    """The split leaves one side of the log empty, or is not a time at all."""


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    holdout: float = 0.2
    # Hold out from this time on instead (seconds since the epoch).
    split_at: float | None = None
    train_groups: int = 50_000
    eval_groups: int = 3_000
    # Negatives per group, sampled from the candidates serving would score.
    negatives: int = 50
    seed: int = 7
    top_n: int = 10
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    # None: decide from the training log's share of repeated (user, item) events.
    exclude_seen: bool | None = None
    # Outcomes label an impression this long after it (seconds).
    label_window: float = LABEL_WINDOW_SECS


@dataclass(slots=True)
class Groups:
    """Stacked training examples: features, labels, group sizes, and each row's
    served position (1, 2, ... in an impression group; NOT_SHOWN otherwise)."""

    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    sampled: int = 0
    skipped_unknown_user: int = 0
    skipped_not_retrieved: int = 0
    # Sampled events that are an outcome of a logged impression (its group has them).
    skipped_impression_outcome: int = 0
    from_impressions: int = 0

    def matrix(self) -> np.ndarray:
        if not self.features:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return np.concatenate(self.features)

    def label_vector(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros(0)

    def position_vector(self) -> np.ndarray | None:
        """Positions for LightGBM's position-debiased lambdarank; None without an
        impression group (nothing to debias)."""
        if not self.from_impressions:
            return None
        return np.concatenate(self.positions).astype(np.int32)

    @property
    def from_sampled(self) -> int:
        return len(self.sizes) - self.from_impressions


@dataclass(frozen=True, slots=True)
class Split:
    split_ts: float
    n_train: int
    n_events: int

    def summary(self) -> dict[str, float | int]:
        return {
            "split_ts": self.split_ts,
            "train_events": self.n_train,
            "held_out_events": self.n_events - self.n_train,
        }


@dataclass(slots=True)
class Dataset:
    train: Groups
    test: evaluation.EvalSet
    split: Split
    neighbours: NeighbourTable | None
    config: DatasetConfig
    n_users: int
    n_items: int
    repeat_share: float
    # Given impressions: the held-out ones' evaluation groups, and the counts.
    impression_test: impression_eval.ImpressionEvalSet | None = None
    impressions: ImpressionStats | None = None

    @property
    def split_ts(self) -> float:
        return self.split.split_ts


def split_log(log: EventLog, holdout: float, split_at: float | None = None) -> Split:
    """Where training ends: at the given time, or before the last ``holdout`` share
    of events (events at the split time all go to the held-out side)."""
    n = len(log)
    if n == 0:
        raise SplitError("the event log is empty")
    if split_at is None:
        if not 0.0 < holdout < 1.0:
            raise SplitError(f"holdout must be between 0 and 1, not {holdout}")
        k = min(max(round((1.0 - holdout) * n), 1), n - 1) if n > 1 else 0
        split_at = float(log.ts[k])
    if not np.isfinite(split_at):
        raise SplitError(f"the split time {split_at} is not a time")
    n_train = int(np.searchsorted(log.ts, split_at, side="left"))
    span = f"the log runs from {log.ts[0]:.0f} to {log.ts[-1]:.0f} (seconds)"
    if n_train == 0:
        raise SplitError(f"no events before the split at {split_at:.0f}: {span}")
    if n_train == n:
        raise SplitError(f"no held-out events from the split at {split_at:.0f} on: {span}")
    return Split(float(split_at), n_train, n)


def repeat_share(log: EventLog, n: int) -> float:
    """Share of the first ``n`` events on an item their user had touched before."""
    if n == 0:
        return 0.0
    pairs = log.user[:n].astype(np.int64) * len(log.item_ids) + log.item[:n]
    return 1.0 - len(np.unique(pairs)) / n


def learn_table(
    log: EventLog,
    split: Split,
    config: LearnConfig,
    progress: Callable[[str], None] | None = None,
) -> NeighbourTable:
    n = split.n_train
    return learn(log.ts[:n], log.user[:n], log.item[:n], log.item_ids, config, progress)


def build(
    log: EventLog,
    catalogue: Catalogue | None,
    config: DatasetConfig,
    progress: Callable[[int], None] | None = None,
    neighbours: NeighbourTable | None = None,
    stage: Callable[[str], None] | None = None,
    learn_neighbours: bool = True,
    impressions: ImpressionLog | None = None,
    train_impressions: bool = True,
    reference: bool = False,
) -> Dataset:
    """Training groups and held-out evaluation groups, from the state just before
    each sampled event.

    ``neighbours``: the table to serve with (``recsvc evaluate`` passes the
    model's own); when None and ``learn_neighbours``, it is learned from the
    training events. ``impressions``: logged answers and their outcomes (training
    groups from those before the split unless not ``train_impressions``, and the
    impression protocol's groups from those after it).

    The state before each sampled event and impression comes from
    ``features.pointintime`` (vectorised); with ``reference``, from the
    event-by-event replay (``features.replay``, the definition the parity tests
    hold it to).
    """
    split = split_log(log, config.holdout, config.split_at)
    repeats = repeat_share(log, split.n_train)
    exclude_seen = config.exclude_seen
    if exclude_seen is None:
        exclude_seen = repeats < REPEAT_SHARE_ALLOWS_SEEN
    cand_config = replace(config.candidates, exclude_seen=exclude_seen)
    config = replace(config, candidates=cand_config, exclude_seen=exclude_seen)
    if neighbours is None and learn_neighbours and split.n_train:
        neighbours = learn_table(log, split, config.learn, stage)
    # Separate streams: the evaluated events do not depend on how many training
    # groups were asked for, so `train` and `evaluate` measure the same events.
    rng = np.random.default_rng([config.seed, 0])
    train_pick = _sample(rng, 0, split.n_train, config.train_groups)
    test_pick = _sample(
        np.random.default_rng([config.seed, 1]), split.n_train, split.n_events, config.eval_groups
    )
    wanted = {int(k): False for k in train_pick} | {int(k): True for k in test_pick}
    eval_users = {int(log.user[k]) for k in test_pick.tolist()}
    # The event-by-event replay when asked (the reference), or when the log's
    # busiest users make folding each sample's history cost more than it.
    pit = None if reference else PointInTime(log, catalogue)
    if pit is not None:
        gathered = pit.users.gathered(np.concatenate([train_pick, test_pick]))
        if gathered > REPLAY_FACTOR * len(log):
            if stage is not None:
                stage(f"replay (samples' histories hold {gathered / len(log):.0f}x the log)")
            pit = None
    replay = Replay(catalogue) if pit is None else None

    def items() -> ItemTable:
        if replay is not None:
            return replay.items
        assert pit is not None
        return pit.table

    def view(user: UserState) -> contextlib.AbstractContextManager[None]:
        """The user's recent items' co-visits as of now (see PointInTime.view)."""
        return pit.view(user) if pit is not None else contextlib.nullcontext()

    train = Groups(sampled=len(train_pick))
    test = evaluation.EvalSet(sampled=len(test_pick), top_n=config.top_n)
    # The items each evaluated user touched so far (exact, for "new to the user").
    touched: dict[str, set[str]] = {}
    # Impressions keep their own popularity index: when it is rebuilt must not
    # move the next-event groups' features (with or without impressions, those
    # stay the same).
    state: dict[str, object] = {"pop": None, "pop_logged": None, "binding": None}
    logged = None
    if impressions is not None:
        logged = Logged.of(
            impressions,
            split.split_ts,
            config.label_window,
            config.eval_groups,
            config.seed,
            config.top_n,
            train_impressions,
        )
    if stage is not None:
        stage("replay")

    def bound() -> Bound | None:
        if neighbours is None:
            return None
        previous = state["binding"]
        assert previous is None or isinstance(previous, Binding)
        table = items()
        if previous is None or previous.count < table.count:
            state["binding"] = previous = neighbours.bind(table, previous)
        return Bound(neighbours, previous)

    rankings: dict[str, Popularity] = {}

    def popularity(ts: float, every: float, key: str = "pop") -> PopularityIndex:
        index = state[key]
        if not isinstance(index, PopularityIndex) or ts - index.built_at > every:
            if pit is None:
                index = PopularityIndex.build(items(), ts)
            else:  # the same lists, kept current instead of rebuilt
                if key not in rankings:
                    rankings[key] = Popularity(pit.items)
                index = rankings[key].index(ts)
            state[key] = index
        return index

    def before(k: int, ts: float, user_id: str, item_id: str, event_type: int) -> None:
        if logged is not None:
            take_impressions(ts)
        if k not in wanted:
            return
        seen = item_id in touched.get(user_id, set())
        assert replay is not None
        sample(k, ts, user_id, item_id, event_type, replay.users.get(user_id), seen)

    def sample(
        k: int,
        ts: float,
        user_id: str,
        item_id: str,
        event_type: int,
        user: UserState | None,
        touched_before: bool,
    ) -> None:
        """One sampled event, with the state just before it."""
        is_test = wanted[k]
        if (
            logged is not None
            and not is_test
            and logged.labels.is_outcome(user_id, item_id, event_type, ts)
        ):
            train.skipped_impression_outcome += 1
            return
        if user is None:
            (test if is_test else train).skipped_unknown_user += 1
            return
        table = items()
        positive = table.ensure_item(item_id)
        every = EVAL_POPULARITY_SECS if is_test else TRAIN_POPULARITY_SECS
        with view(user):
            found = retrieve(
                user, table, popularity(ts, every), cand_config, np.zeros(0, np.int64), ts, bound()
            )
            cand = assemble(found, cand_config)
            if is_test:
                group = _eval_group(found, cand, positive, user, table, ts, config, touched_before)
                group.user = int(log.user[k])
                test.add(group)
                return
            hit = np.flatnonzero(cand.index == positive)
            if not len(hit):
                train.skipped_not_retrieved += 1
                return
            others = np.delete(cand.index, hit)
            k_neg = min(config.negatives, len(others))
            others = rng.choice(others, size=k_neg, replace=False) if k_neg else others
            idx = np.concatenate([[positive], others]).astype(np.int64)
            matrix = build_matrix(user, table, idx, ts, retrieval=found)
        labels = np.zeros(len(idx))
        labels[0] = GRADES[event_type]
        train.features.append(matrix)
        train.labels.append(labels)
        train.sizes.append(len(idx))
        train.positions.append(np.full(len(idx), NOT_SHOWN, dtype=np.int32))

    def take_impressions(until: float) -> None:
        """The impressions up to ``until`` (before an event of the same time: an
        answer's outcomes follow it), with the state just before them."""
        assert logged is not None and replay is not None
        for imp, held_out in logged.due(until):
            impression(imp, held_out, replay.users.get(imp.user_id))

    def impression(imp: Impression, held_out: bool, user: UserState | None) -> None:
        """One logged impression, with its user's state just before it."""
        assert logged is not None
        table = items()
        if user is None:
            logged.unknown_user(held_out)
            return
        shown = None if held_out else logged.shown_group(imp, table)
        grades = logged.known_grades(imp, table) if held_out else None
        if shown is None and grades is None:
            return
        every = EVAL_POPULARITY_SECS if held_out else TRAIN_POPULARITY_SECS
        with view(user):
            found = retrieve(
                user,
                table,
                popularity(imp.ts, every, "pop_logged"),
                cand_config,
                np.zeros(0, np.int64),
                imp.ts,
                bound(),
            )
            if grades is not None:
                logged.add_eval_group(imp, grades, user, table, found, cand_config)
                return
            assert shown is not None
            matrix = build_matrix(user, table, shown.rows, imp.ts, retrieval=found)
        train.features.append(matrix)
        train.labels.append(shown.labels)
        train.sizes.append(len(shown.rows))
        train.positions.append(shown.positions)
        train.from_impressions += 1

    users = log.user_ids

    def after(k: int) -> None:
        u = int(log.user[k])
        if u in eval_users:
            touched.setdefault(users[u], set()).add(log.item_ids[int(log.item[k])])

    if replay is not None:
        replay.run(log, before=before, progress=progress, after=after)
        if logged is not None:
            take_impressions(np.inf)
        n_users, n_items = len(replay.users), replay.items.count
    else:
        assert pit is not None
        picked = np.sort(np.concatenate([train_pick, test_pick]))
        # Impressions go before the first event at or after their time (as the
        # replay takes them), and before that event's own group.
        queued = list(logged.due(np.inf)) if logged is not None else []
        imp_at = np.searchsorted(log.ts, [imp.ts for imp, _ in queued], side="left")
        code = {u: c for c, u in enumerate(users)} if queued else {}
        ks = np.concatenate([imp_at, picked]).astype(np.int64)
        who = np.concatenate(
            [
                np.asarray([code.get(imp.user_id, -1) for imp, _ in queued], np.int64),
                log.user[picked].astype(np.int64),
            ]
        )
        kind = np.concatenate([np.arange(len(queued)), np.full(len(picked), -1)])
        order = np.lexsort((np.arange(len(ks)), ks))
        ks, who, kind = ks[order], who[order], kind[order]
        item_ids = log.item_ids
        points = pit.before_each(ks, who, progress)
        for (k, user, seen), j in zip(points, kind.tolist(), strict=True):
            if j >= 0:
                imp, held_out = queued[j]
                impression(imp, held_out, user)
                continue
            sample(
                k,
                float(log.ts[k]),
                users[int(log.user[k])],
                item_ids[int(log.item[k])],
                int(log.type[k]),
                user,
                seen,
            )
        if progress is not None and pit.items.pos < len(log):
            progress(len(log) - pit.items.pos)  # the rest of the log changes no group
        n_users = int(np.count_nonzero(np.bincount(log.user))) if len(log) else 0
        n_items = pit.items.layout.count
    return Dataset(
        train=train,
        test=test,
        split=split,
        neighbours=neighbours,
        config=config,
        n_users=n_users,
        n_items=n_items,
        repeat_share=repeats,
        impression_test=logged.test if logged is not None else None,
        impressions=logged.stats if logged is not None else None,
    )


def _eval_group(
    found: Retrieval,
    cand: Candidates,
    positive: int,
    user: UserState,
    table: ItemTable,
    ts: float,
    config: DatasetConfig,
    touched_before: bool,
) -> evaluation.EvalGroup:
    matrix = build_matrix(user, table, cand.index, ts, retrieval=found)
    # The in-set figure needs the true item's row even when retrieval missed it.
    true_row = None
    if not np.any(cand.index == positive):
        true_row = build_matrix(user, table, np.asarray([positive]), ts, retrieval=found)[0]
    return evaluation.EvalGroup(
        candidates=cand.index,
        sources=cand.source,
        matrix=matrix,
        positive=positive,
        true_row=true_row,
        baselines=evaluation.baselines(found, config.top_n),
        found_by={
            SOURCES[s]: bool(
                np.any(evaluation.served_list(found, r, quota(config.candidates, s)) == positive)
            )
            for s, r in found.lists.items()
        },
        touched_before=touched_before,
    )


def _sample(rng: np.random.Generator, lo: int, hi: int, k: int) -> np.ndarray:
    if hi <= lo or k <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(np.arange(lo, hi), size=min(k, hi - lo), replace=False)
