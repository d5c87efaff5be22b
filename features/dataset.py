"""Point-in-time ranking examples and served-list evaluation groups from one replay.

The log is split by event count (the last ``holdout`` share of events is held
out, never a share of the time range: a log whose first event lies months
before the rest still trains on 80% of its events) or at a given time. The
learned neighbour table comes from the training events only. One replay then
walks the whole log through the pure state:

- at sampled training events, the candidates the service would have generated
  just before the event; a group is the labelled item plus negatives sampled
  from those candidates, and only events whose item the sources found make a
  group (the ranker learns to order what serving will give it);
- at sampled held-out events of users with history, everything needed to build
  the lists the service would serve then, and the baselines' lists
  (``features.evaluation`` scores them once the model exists).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from features import evaluation
from features.candidates import (
    SOURCE_POPULAR,
    SOURCES,
    CandidateConfig,
    Candidates,
    Ranked,
    Retrieval,
    assemble,
    quota,
    retrieve,
)
from features.item2item import LearnConfig, learn
from features.logs import Catalogue, EventLog
from features.neighbours import Binding, Bound, NeighbourTable
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import FEATURE_NAMES, build_matrix
from features.state import ItemTable, UserState

# Relevance grade of the labelled item by event type (negatives are 0).
GRADES = (1, 2, 3, 4)
# The offline popularity index is rebuilt at most this often (log seconds) for
# training groups, and for evaluation groups as often as the serving cache.
TRAIN_POPULARITY_SECS = 300.0
EVAL_POPULARITY_SECS = 2.0
# Below this share of repeated (user, item) events, a catalogue is one of things
# used once (films, books): recommending what the user already touched is waste.
REPEAT_SHARE_ALLOWS_SEEN = 0.05


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


@dataclass(slots=True)
class Groups:
    """Stacked training examples: features, labels and group sizes."""

    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    sampled: int = 0
    skipped_unknown_user: int = 0
    skipped_not_retrieved: int = 0

    def matrix(self) -> np.ndarray:
        if not self.features:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return np.concatenate(self.features)

    def label_vector(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros(0)


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
) -> Dataset:
    """Replay the log once and collect training groups and held-out evaluation groups.

    ``neighbours``: the table to serve with (``recsvc evaluate`` passes the
    model's own); when None and ``learn_neighbours``, it is learned from the
    training events.
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
    replay = Replay(catalogue)
    train = Groups(sampled=len(train_pick))
    test = evaluation.EvalSet(sampled=len(test_pick), top_n=config.top_n)
    # The items each evaluated user touched so far (exact, for "new to the user").
    touched: dict[str, set[str]] = {}
    state: dict[str, object] = {"pop": None, "binding": None}
    if stage is not None:
        stage("replay")

    def bound() -> Bound | None:
        if neighbours is None:
            return None
        previous = state["binding"]
        assert previous is None or isinstance(previous, Binding)
        if previous is None or previous.count < replay.items.count:
            state["binding"] = previous = neighbours.bind(replay.items, previous)
        return Bound(neighbours, previous)

    def popularity(ts: float, every: float) -> PopularityIndex:
        index = state["pop"]
        if not isinstance(index, PopularityIndex) or ts - index.built_at > every:
            index = state["pop"] = PopularityIndex.build(replay.items, ts)
        return index

    def before(k: int, ts: float, user_id: str, item_id: str, event_type: int) -> None:
        is_test = wanted.get(k)
        if is_test is None:
            return
        user = replay.users.get(user_id)
        if user is None:
            (test if is_test else train).skipped_unknown_user += 1
            return
        table = replay.items
        positive = table.ensure_item(item_id)
        every = EVAL_POPULARITY_SECS if is_test else TRAIN_POPULARITY_SECS
        found = retrieve(
            user, table, popularity(ts, every), cand_config, np.zeros(0, np.int64), ts, bound()
        )
        cand = assemble(found, cand_config)
        if is_test:
            seen = touched.get(user_id, set())
            group = _eval_group(found, cand, positive, user, table, ts, config, item_id in seen)
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
        labels = np.zeros(len(idx))
        labels[0] = GRADES[event_type]
        train.features.append(build_matrix(user, table, idx, ts, retrieval=found))
        train.labels.append(labels)
        train.sizes.append(len(idx))

    users = log.user_ids

    def after(k: int) -> None:
        u = int(log.user[k])
        if u in eval_users:
            touched.setdefault(users[u], set()).add(log.item_ids[int(log.item[k])])

    replay.run(log, before=before, progress=progress, after=after)
    return Dataset(
        train=train,
        test=test,
        split=split,
        neighbours=neighbours,
        config=config,
        n_users=len(replay.users),
        n_items=replay.items.count,
        repeat_share=repeats,
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
    n = config.top_n
    banned = found.banned

    def served(ranked: Ranked | None, size: int = n) -> np.ndarray:
        """A list as the service would use it: banned items out, the first ``size``."""
        items = ranked.items if ranked is not None else np.zeros(0, np.int64)
        if len(banned) and len(items):
            items = items[~np.isin(items, banned)]
        return items[:size]

    matrix = build_matrix(user, table, cand.index, ts, retrieval=found)
    # The in-set figure needs the true item's row even when retrieval missed it.
    true_row = None
    if not np.any(cand.index == positive):
        true_row = build_matrix(user, table, np.asarray([positive]), ts, retrieval=found)[0]
    recent = found.recent[found.recent >= 0]
    return evaluation.EvalGroup(
        candidates=cand.index,
        sources=cand.source,
        matrix=matrix,
        positive=positive,
        true_row=true_row,
        baselines={
            # The default strategy as served to a known user, and two simple
            # recommenders: the user's own recent items, and the items most
            # related (co-occurring in sessions) to their last five.
            "popular": served(found.lists.get(SOURCE_POPULAR)),
            "recent": served(Ranked.of(recent)),
            "cooccurrence": served(
                Ranked.of(found.affinity.ranked("related", 5))
                if found.affinity is not None
                else None
            ),
        },
        found_by={
            SOURCES[s]: bool(np.any(served(r, quota(config.candidates, s)) == positive))
            for s, r in found.lists.items()
        },
        touched_before=touched_before,
    )


def _sample(rng: np.random.Generator, lo: int, hi: int, k: int) -> np.ndarray:
    if hi <= lo or k <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(np.arange(lo, hi), size=min(k, hi - lo), replace=False)
