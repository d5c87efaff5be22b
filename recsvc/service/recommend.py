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
from features.popularity import scores_of
from features.schema import NO_CONTEXT, Context, build_matrix
from features.state import COL_CATEGORY, ItemTable, UserState
from recsvc.errors import Overloaded, StoreUnavailable
from recsvc.ops.looplag import LoopLag
from recsvc.ranking.models import LoadedModel, ModelRegistry
from recsvc.service.admission import Admission
from recsvc.service.itemcache import ItemCache, ItemView
from recsvc.service.timing import StageTimer
from recsvc.store.feature_store import FeatureStore

log = logging.getLogger(__name__)

UNKNOWN_USER = "unknown_user"
STORE_UNAVAILABLE = "feature_store_unavailable"
MODEL_UNAVAILABLE = "model_unavailable"
MODEL_ERROR = "model_error"
NO_CANDIDATES = "no_candidates"
# The request's deadline passed before a stage could start, while the process
# was keeping up (e.g. a model too slow for the deadline).
DEADLINE = "deadline"
# The process is saturated: the request waited in queues (the event loop, the
# CPU section, the Redis pool) until its time ran out, or admission control
# chose the default strategy for it. Never blamed on Redis.
OVERLOADED = "overloaded"


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
    # perf_counter() when the request arrived (None: unknown), and the seconds
    # it waited before the handler took it up.
    arrived: float | None = None
    queued: float = 0.0
    # LoopLag.mark() when the handler took the request up (None: unknown).
    mark: tuple[float, float] | None = None
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
    # A canary roll-out's decision for this answer (which arm served, the
    # roll-out's name and the canary's traffic share then); recorded in the
    # impression, not in the answer.
    arm: str | None = None
    rollout: str | None = None
    canary_share: float | None = None

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
        admission: Admission | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        self.store = store
        self.items = items
        self.models = models
        self.config = config
        # Its lock is held while a request computes, and learns how long that
        # took (recsvc.admission); None: neither.
        self.admission = admission
        self.lag = lag
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

    def _crowded(self) -> bool:
        """Whether requests are likely being turned away right now."""
        a = self.admission
        return a is not None and a.inflight + 1 >= a.limit

    def overloaded(self, q: Query) -> Result:
        """The default strategy at once, reason overloaded (admission control's
        answer with overload_response=default): no Redis read, so no per-user
        bans beyond the request's exclusions."""
        result = self._fallback(q, None, OVERLOADED, StageTimer())
        result.experiments, result.forced = q.experiments, q.forced
        return result

    def _late(self, q: Query, timer: StageTimer) -> str | None:
        """None while the request is in time; else why not (overloaded or deadline)."""
        if q.deadline is None or asyncio.get_running_loop().time() < q.deadline:
            return None
        return self._why_late(q, timer)

    def _why_late(self, q: Query, timer: StageTimer) -> str:
        """Overloaded when the time went to other requests: a quarter or more of it
        spent waiting (before the handler, for the CPU section), or the process
        busy since arrival (recsvc.ops.looplag.LoopLag.saturated); else deadline
        (e.g. a model too slow for the deadline)."""
        if q.arrived is None:
            return DEADLINE
        waited = timer.stages.get("queue", 0.0) + timer.stages.get("cpu_wait", 0.0)
        if waited >= 0.25 * (time.perf_counter() - q.arrived):
            return OVERLOADED
        if self.lag is not None and q.mark is not None and self.lag.saturated(q.mark):
            return OVERLOADED
        return DEADLINE

    async def _recommend(self, q: Query) -> Result:
        timer = StageTimer()
        timer.stages["queue"] = q.queued
        if late := self._late(q, timer):  # e.g. a long queue in front of this request
            return self._fallback(q, None, late, timer)
        try:
            user = await self.store.fetch_user(q.user_id, q.deadline)
        except Overloaded as exc:
            log.debug("overloaded: %s", exc.reason)
            timer.mark("redis")
            return self._fallback(q, None, OVERLOADED, timer)
        except StoreUnavailable as exc:
            log.debug("feature store unavailable: %s", exc.reason)
            timer.mark("redis")
            return self._fallback(q, None, STORE_UNAVAILABLE, timer)
        timer.mark("redis")
        if user is None:
            return self._fallback(q, None, UNKNOWN_USER, timer)
        if q.strategy == "popular":  # chosen by an experiment: not a fallback
            return self._fallback(q, user, None, timer, strategy="popular")
        model = self.models.get(q.model) if q.model else self.models.current
        if model is None:
            return self._fallback(q, user, MODEL_UNAVAILABLE, timer)
        if self.admission is None:
            result, rows = await self._score(q, user, model, timer)
        else:
            async with self.admission.cpu:
                timer.mark("cpu_wait")
                waited = timer.stages["cpu_wait"]
                section = time.perf_counter()
                result, rows = await self._score(q, user, model, timer)
            if result.strategy == "model":  # the turns of the loop are not its cost
                took = time.perf_counter() - section - (timer.stages["cpu_wait"] - waited)
                self.admission.computed(took)
        if rows is not None and model is not None:
            # TreeSHAP costs several times the scoring: in a thread (LightGBM
            # releases the GIL), outside the CPU section, so other requests are
            # not held up by it.
            explained = await asyncio.to_thread(explain, model, rows, q.explain_top)
            for item, explanation in zip(result.items, explained, strict=True):
                item["explanation"] = explanation
            timer.mark("explain")
        return result

    async def _score(
        self, q: Query, user: UserState, model: LoadedModel, timer: StageTimer
    ) -> tuple[Result, np.ndarray | None]:
        """Candidates, features, scores and the answer's items, and the returned
        items' feature rows when the query wants explanations.

        CPU work in three slices with a turn of the event loop between them when
        the admission limit is (nearly) reached, so that the loop reads its
        sockets and turns away what it must every few hundred microseconds, not
        once per request. A turn costs ~50 µs of CPU, so not when it is quiet."""
        if late := self._late(q, timer):
            return self._fallback(q, user, late, timer, model=model), None
        # One consistent item view for the request, across the turns.
        view = self.items.view
        now = time.time()
        found, candidates = self._candidates(q, user, view, model, now)
        timer.mark("candidates")
        if len(candidates) == 0:
            return self._fallback(q, user, NO_CANDIDATES, timer, model=model), None
        if self._crowded():
            await asyncio.sleep(0)
            timer.mark("cpu_wait")
        try:
            matrix = build_matrix(
                user, view.table, candidates.index, now, context=q.context, retrieval=found
            )
            timer.mark("features")
            if self._crowded():
                await asyncio.sleep(0)
                timer.mark("cpu_wait")
            if late := self._late(q, timer):  # scoring is the costliest stage: not late
                return self._fallback(q, user, late, timer, model=model), None
            scores = model.predict(matrix)
        except Exception:  # a broken model or feature must not break the answer
            log.exception("scoring failed", extra={"model": model.version, "user": q.user_id})
            return self._fallback(q, user, MODEL_ERROR, timer, model=model), None
        timer.mark("score")
        best = top_n(scores, q.n)
        sources = [cands.SOURCES[s] for s in candidates.source[best].tolist()]
        items = _items(view.table, candidates.index[best], scores[best], sources)
        result = Result(q.request_id, q.user_id, items, "model", None, _model_ref(model), timer)
        return result, matrix[best] if q.explain else None

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
            scores = scores_of(table, pool, popularity.built_at)
            best = top_n(scores, q.n) if len(pool) else np.zeros(0, np.int64)
            pool, scores = pool[best], scores[best]
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
            scores = scores_of(table, pool, popularity.built_at)
        timer.mark("fallback")
        items = _items(table, pool, scores, sources)
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
