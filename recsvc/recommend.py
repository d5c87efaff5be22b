"""Recommendation orchestration (no HTTP here): state -> candidates -> features -> score.

Every failure of a dependency ends in the default strategy with its reason;
nothing here raises to the caller for a dependency problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from features import candidates as cands
from features.candidates import CandidateConfig, Candidates
from features.metrics import top_n
from features.schema import NO_CONTEXT, Context, build_matrix
from features.state import COL_CATEGORY, ItemTable, UserState
from recsvc.errors import StoreUnavailable
from recsvc.itemcache import ItemCache, ItemView
from recsvc.models import LoadedModel, ModelRegistry
from recsvc.store import FeatureStore
from recsvc.timing import StageTimer

log = logging.getLogger(__name__)

UNKNOWN_USER = "unknown_user"
STORE_UNAVAILABLE = "feature_store_unavailable"
MODEL_UNAVAILABLE = "model_unavailable"
MODEL_ERROR = "model_error"
NO_CANDIDATES = "no_candidates"
# The request's deadline passed: during the user-state read, or before a later
# stage could start.
DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class Query:
    """A validated recommendation request."""

    request_id: str
    user_id: str
    n: int
    candidates: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    category: str | None = None
    context: Context = NO_CONTEXT
    # A/B: what the user's variants select (None = the default configuration).
    model: str | None = None
    strategy: str = "model"
    candidate_config: CandidateConfig | None = None
    experiments: dict[str, str] = field(default_factory=dict)
    forced: frozenset[str] = frozenset()
    # Event-loop time by which the answer must be on its way (None: no deadline).
    deadline: float | None = None
    # Feature contributions per returned item, the largest ``explain_top``.
    explain: bool = False
    explain_top: int = 5


@dataclass(slots=True)
class Result:
    request_id: str
    user_id: str
    items: list[dict[str, Any]]
    strategy: str
    fallback_reason: str | None
    model: dict[str, str] | None
    timer: StageTimer
    experiments: dict[str, str] = field(default_factory=dict)
    forced: frozenset[str] = frozenset()

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "items": self.items,
            "strategy": self.strategy,
            "fallback_reason": self.fallback_reason,
            "model": self.model,
            "experiments": self.experiments,
        }
        if self.forced:
            body["forced"] = sorted(self.forced)  # left out of experiment analysis
        return body


def _items(
    table: ItemTable, idx: np.ndarray, scores: np.ndarray, source: list[str]
) -> list[dict[str, Any]]:
    ids, names = table.ids, table.categories
    cats = table.raw[idx, COL_CATEGORY].astype(np.int64).tolist() if len(idx) else []
    return [
        {
            "item_id": ids[i],
            "score": s,
            "rank": r + 1,
            "source": src,
            "category": names[c] if c >= 0 else None,
        }
        for r, (i, s, src, c) in enumerate(
            zip(idx.tolist(), scores.tolist(), source, cats, strict=True)
        )
    ]


class Recommender:
    """Serves one query end to end from the store, item cache and model registry."""

    def __init__(
        self,
        store: FeatureStore,
        items: ItemCache,
        models: ModelRegistry,
        config: CandidateConfig,
        exclude_seen: str = "auto",
    ) -> None:
        self.store = store
        self.items = items
        self.models = models
        self.config = config
        # "auto": as the serving model's training log said; "always" / "never".
        self.exclude_seen = exclude_seen

    def _excludes_seen(self, model: LoadedModel | None) -> bool:
        if self.exclude_seen == "auto":
            model = model or self.models.current
            return model is not None and model.exclude_seen
        return self.exclude_seen == "always"

    async def recommend(self, q: Query) -> Result:
        result = await self._recommend(q)
        result.experiments, result.forced = q.experiments, q.forced
        return result

    def _late(self, q: Query) -> bool:
        return q.deadline is not None and asyncio.get_running_loop().time() >= q.deadline

    async def _recommend(self, q: Query) -> Result:
        timer = StageTimer()
        if self._late(q):  # e.g. a long queue in front of this request
            return self._fallback(q, None, DEADLINE, timer)
        try:
            user = await self.store.fetch_user(q.user_id, q.deadline)
        except StoreUnavailable as exc:
            log.debug("feature store unavailable: %s", exc.reason)
            timer.mark("redis")
            reason = DEADLINE if exc.reason == "deadline" else STORE_UNAVAILABLE
            return self._fallback(q, None, reason, timer)
        timer.mark("redis")
        if user is None:
            return self._fallback(q, None, UNKNOWN_USER, timer)
        if q.strategy == "popular":  # chosen by an experiment: not a fallback
            return self._fallback(q, user, None, timer, strategy="popular")
        model = self.models.get(q.model) if q.model else self.models.current
        if model is None:
            return self._fallback(q, user, MODEL_UNAVAILABLE, timer)
        if self._late(q):
            return self._fallback(q, user, DEADLINE, timer, model=model)
        # From here on nothing awaits: one consistent item view for the request.
        view = self.items.view
        now = time.time()
        found, candidates = self._candidates(q, user, view, model, now)
        timer.mark("candidates")
        if len(candidates) == 0:
            return self._fallback(q, user, NO_CANDIDATES, timer, model=model)
        try:
            matrix = build_matrix(
                user, view.table, candidates.index, now, context=q.context, retrieval=found
            )
            timer.mark("features")
            if self._late(q):  # scoring is the costliest stage: do not start it late
                return self._fallback(q, user, DEADLINE, timer, model=model)
            scores = model.predict(matrix)
        except Exception:  # a broken model or feature must not break the answer
            log.exception("scoring failed", extra={"model": model.version, "user": q.user_id})
            return self._fallback(q, user, MODEL_ERROR, timer, model=model)
        timer.mark("score")
        best = top_n(scores, q.n)
        sources = [cands.SOURCES[s] for s in candidates.source[best].tolist()]
        items = _items(view.table, candidates.index[best], scores[best], sources)
        if q.explain:
            # TreeSHAP costs several times the scoring: in a thread (LightGBM
            # releases the GIL), so other requests are not held up by it.
            explained = await asyncio.to_thread(explain, model, matrix[best], q.explain_top)
            for item, explanation in zip(items, explained, strict=True):
                item["explanation"] = explanation
            timer.mark("explain")
        return Result(q.request_id, q.user_id, items, "model", None, _model_ref(model), timer)

    def _candidates(
        self, q: Query, user: UserState, view: ItemView, model: LoadedModel, now: float
    ) -> tuple[cands.Retrieval, Candidates]:
        """The sources' findings (features read them even when the caller sent the
        candidates) and the candidates to score."""
        exclude = cands.ids_to_index(view.table, q.exclude)
        config = self._config(q.candidate_config or self.config, model)
        found = self.retrieve(user, view, model, now, config, exclude)
        if q.candidates is not None:
            return found, cands.from_request(found, view.table, q.candidates, len(q.candidates))
        return found, cands.assemble(found, config)

    def _config(self, config: CandidateConfig, model: LoadedModel | None) -> CandidateConfig:
        if self._excludes_seen(model) != config.exclude_seen:
            config = replace(config, exclude_seen=not config.exclude_seen)
        return config

    def retrieve(
        self,
        user: UserState,
        view: ItemView,
        model: LoadedModel | None,
        now: float,
        config: CandidateConfig | None = None,
        exclude: np.ndarray | None = None,
    ) -> cands.Retrieval:
        """What the candidate sources find for ``user`` when ``model`` serves (its
        learned neighbours, its seen-items policy)."""
        config = config or self._config(self.config, model)
        learned = model.bound(view.epoch, view.table.n, view.bindings) if model else None
        if exclude is None:
            exclude = np.zeros(0, np.int64)
        return cands.retrieve(user, view.table, view.popularity, config, exclude, now, learned)

    def _fallback(
        self,
        q: Query,
        user: UserState | None,
        reason: str | None,
        timer: StageTimer,
        strategy: str = "fallback",
        model: LoadedModel | None = None,
    ) -> Result:
        """Default strategy: the most popular items (of the context category first when given).

        When the caller gave candidates, the default orders those by popularity.
        The bans are the model strategy's: excluded, purchased, and (when the
        catalogue is of things used once) everything the user touched.
        """
        view = self.items.view
        table, popularity = view.table, view.popularity
        banned = cands.ids_to_index(table, q.exclude)
        if user is not None:
            config = replace(self.config, exclude_seen=self._excludes_seen(model))
            recent = cands.recent_rows(user, table)[0] if config.exclude_seen else banned[:0]
            banned = cands.banned(user, table, banned, recent, config)
        if q.candidates is not None:
            pool = _unique(_allowed(cands.ids_to_index(table, q.candidates), banned))
            pool = pool[top_n(popularity.scores[pool], q.n)] if len(pool) else pool
            sources = ["request"] * len(pool)
        else:
            in_category = np.zeros(0, np.int64)
            if q.category is not None:
                category = table.category_index.get(q.category, -1)
                in_category = _allowed(popularity.for_category(category), banned)[: q.n]
            # Filter before padding, so exclusions never shorten the answer.
            pool = _unique(np.concatenate([in_category, _allowed(popularity.top, banned)]))[: q.n]
            sources = ["category_popular"] * min(len(in_category), len(pool))
            sources += ["popular"] * (len(pool) - len(sources))
        timer.mark("fallback")
        items = _items(table, pool, popularity.scores[pool], sources)
        return Result(q.request_id, q.user_id, items, strategy, reason, None, timer)


OTHER = "(other)"


def explain(model: LoadedModel, rows: np.ndarray, top: int) -> list[dict[str, Any]]:
    """Per row: LightGBM's TreeSHAP contributions (``pred_contrib``, raw score units),
    the ``top`` largest by magnitude with their feature values, then "(other)" with
    the sum of the rest, so base_value + sum(contributions) = the row's raw score.
    Computed for the returned items only (TreeSHAP costs far more than scoring)."""
    contrib = np.asarray(model.booster.predict(rows, pred_contrib=True, num_threads=1))
    names = model.booster.feature_name()
    per_feature, base = contrib[:, :-1], contrib[:, -1]
    k = min(top, per_feature.shape[1])
    order = np.argsort(-np.abs(per_feature), axis=1, kind="stable")[:, :k]
    shown = np.take_along_axis(per_feature, order, axis=1)
    other = per_feature.sum(axis=1) - shown.sum(axis=1)
    values = np.take_along_axis(rows, order, axis=1).astype(np.float64)
    out = []
    for r in range(len(rows)):
        entries = [
            {"feature": names[j], "value": None if v != v else v, "contribution": c}  # NaN: None
            for j, v, c in zip(
                order[r].tolist(), values[r].tolist(), shown[r].tolist(), strict=True
            )
        ]
        entries.append({"feature": OTHER, "value": None, "contribution": float(other[r])})
        out.append({"base_value": float(base[r]), "contributions": entries})
    return out


def _unique(pool: np.ndarray) -> np.ndarray:
    """``pool`` with repeats dropped, first occurrence kept."""
    _, first = np.unique(pool, return_index=True)
    return pool[np.sort(first)]


def _allowed(pool: np.ndarray, banned: np.ndarray) -> np.ndarray:
    """``pool`` without the banned indices, order kept."""
    return pool[~np.isin(pool, banned)] if len(banned) and len(pool) else pool


def _model_ref(model: LoadedModel) -> dict[str, str]:
    return {"name": model.name, "version": model.version}
