"""Point-in-time ranking examples from a replayed log.

For a sample of labelled events, the features are taken from the state just
before the event, over the candidates the service itself would have generated
then (plus the labelled item). Training groups keep a sample of those as
negatives plus a few drawn by popularity and a few uniform ones (so the model
also sees items serving would not propose); evaluation groups keep all the
candidates, so the model and the baselines are compared on what serving would
rank. Logs with exposures (what was shown) will group by exposure instead, once
the service logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from features.candidates import CandidateConfig, from_sources, top_categories
from features.logs import Catalogue, EventLog
from features.popularity import PopularityIndex
from features.replay import Replay
from features.schema import FEATURE_NAMES, build_matrix

# Relevance grade of the labelled item by event type (negatives are 0).
GRADES = (1, 2, 3, 4)
# The offline popularity index is rebuilt at most this often (log seconds),
# like the serving cache's background refresh, but cheaper to replay.
POPULARITY_REBUILD_SECS = 300.0


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    holdout: float = 0.2
    train_groups: int = 20_000
    eval_groups: int = 4_000
    negatives: int = 24
    popular_negatives: int = 4
    uniform_negatives: int = 4
    seed: int = 7
    candidates: CandidateConfig = field(default_factory=CandidateConfig)


@dataclass(slots=True)
class Groups:
    """Stacked examples: features, labels, group sizes and per-group baselines."""

    features: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    popularity: list[np.ndarray] = field(default_factory=list)
    category_pop: list[np.ndarray] = field(default_factory=list)
    generated_positive: int = 0
    skipped_unknown_user: int = 0

    def matrix(self) -> np.ndarray:
        if not self.features:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return np.concatenate(self.features)

    def label_vector(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros(0)


@dataclass(slots=True)
class Dataset:
    train: Groups
    test: Groups
    split_ts: float
    n_events: int
    n_users: int
    n_items: int


def build(
    log: EventLog,
    catalogue: Catalogue | None,
    config: DatasetConfig,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Replay the log once and collect training and held-out groups."""
    rng = np.random.default_rng(config.seed)
    n = len(log)
    if n == 0:
        raise ValueError("the event log is empty")
    t0, t1 = float(log.ts[0]), float(log.ts[-1])
    split_ts = t1 - config.holdout * (t1 - t0)
    n_train = int(np.searchsorted(log.ts, split_ts, side="left"))
    train_pick = _sample(rng, 0, n_train, config.train_groups)
    test_pick = _sample(rng, n_train, n, config.eval_groups)
    wanted = {int(k): False for k in train_pick} | {int(k): True for k in test_pick}

    replay = Replay(catalogue)
    train, test = Groups(), Groups()
    pop: list[PopularityIndex | None] = [None]
    pop_cum: list[np.ndarray] = [np.zeros(0)]

    def before(k: int, ts: float, user_id: str, item_id: str, event_type: int) -> None:
        is_test = wanted.get(k)
        if is_test is None:
            return
        user = replay.users.get(user_id)
        groups = test if is_test else train
        if user is None:
            groups.skipped_unknown_user += 1
            return
        index = pop[0]
        if index is None or ts - index.built_at > POPULARITY_REBUILD_SECS:
            index = pop[0] = PopularityIndex.build(replay.items, ts)
            pop_cum[0] = np.cumsum(index.scores)
        table = replay.items
        positive = table.ensure_item(item_id)
        cand = from_sources(user, table, index, config.candidates, np.zeros(0, np.int64), ts).index
        found = bool(np.any(cand == positive))
        groups.generated_positive += int(found)
        others = cand[cand != positive]
        if not is_test:
            k_neg = min(config.negatives, len(others))
            others = rng.choice(others, size=k_neg, replace=False) if k_neg else others
            extra = [rng.integers(0, table.n, size=config.uniform_negatives)]
            cum = pop_cum[0]
            if len(cum) and cum[-1] > 0:
                draws = rng.random(config.popular_negatives) * cum[-1]
                extra.append(np.searchsorted(cum, draws, side="right").clip(0, len(cum) - 1))
            sampled = np.concatenate(extra)
            others = np.concatenate([others, sampled[sampled != positive]])
        idx = np.concatenate([[positive], others]).astype(np.int64)
        labels = np.zeros(len(idx))
        labels[0] = GRADES[event_type]
        groups.features.append(build_matrix(user, table, idx, ts))
        groups.labels.append(labels)
        groups.sizes.append(len(idx))
        if is_test:
            scores = index.scores[idx]
            groups.popularity.append(scores)
            tops = top_categories(user, table, config.candidates.top_categories)
            in_top = np.isin(table.category[idx], tops)
            groups.category_pop.append(scores + in_top * (scores.max() + 1.0))

    replay.run(log, before=before, progress=progress)
    return Dataset(
        train=train,
        test=test,
        split_ts=split_ts,
        n_events=n,
        n_users=len(replay.users),
        n_items=replay.items.n,
    )


def _sample(rng: np.random.Generator, lo: int, hi: int, k: int) -> np.ndarray:
    if hi <= lo:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(np.arange(lo, hi), size=min(k, hi - lo), replace=False)
