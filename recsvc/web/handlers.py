"""HTTP handlers: parse and validate, call one orchestration function, serialise."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from features.candidates import CandidateConfig
from features.schema import NO_CONTEXT, Context
from recsvc.ab.impressions import entry
from recsvc.errors import InvalidRequest, Overloaded, StoreUnavailable, UnknownItem
from recsvc.ops import metrics
from recsvc.ranking.models import LoadedModel
from recsvc.service.online import (
    check_cells,
    feature_values_json,
    user_feature_values,
)
from recsvc.service.recommend import DEADLINE as DEADLINE_REASON
from recsvc.service.recommend import OVERLOADED, Query
from recsvc.settings import Settings
from recsvc.web import appkeys
from recsvc.web.api import (
    MAX_GET_IDS,
    CatalogueDelete,
    CatalogueUpsert,
    FeaturesRequest,
    ItemRef,
    RecommendRequest,
    UserRef,
    convert_query,
    decode_events,
    decode_json,
    parse_flags_header,
)
from recsvc.web.frontdoor import ARRIVED, MISSED, NOT_ADMITTED, TICKET
from recsvc.web.middleware import DEADLINE, FROM_CALLER, REQUEST_ID, REQUEST_ID_HEADER, SERVED


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _flags(request: web.Request, body_flags: dict[str, str] | None) -> dict[str, str]:
    """Forced variants from the body and the X-Recsvc-Flags header (body wins)."""
    header = request.headers.get("X-Recsvc-Flags")
    flags = parse_flags_header(header) if header else {}
    return flags | (body_flags or {})


def _candidate_config(settings: Settings, parameters: dict[str, Any]) -> CandidateConfig | None:
    if "sources" not in parameters and "cap" not in parameters:
        return None
    base = settings.candidate_config
    return replace(
        base,
        cap=parameters.get("cap", base.cap),
        sources=parameters.get("sources", base.sources),
    )


async def _admitted(request: web.Request, parse: Callable[[], RecommendRequest]) -> web.Response:
    """Admission control first (recsvc.admission), before any other work, so a
    rejection costs as little as it can: 503 + Retry-After at once, or (with
    overload_response=default) the default strategy with reason overloaded."""
    start = time.perf_counter()
    arrived = request.get(ARRIVED, start)
    admission = request.app[appkeys.ADMISSION]
    if TICKET in request:  # decided at the front door, which also gives the place back
        if request[TICKET] == NOT_ADMITTED:  # overload_response=default
            return (await _serve(request, parse(), start, arrived, admitted=False))[0]
        response, reason = await _serve(request, parse(), start, arrived, admitted=True)
        request[MISSED] = reason in (OVERLOADED, DEADLINE_REASON)
        return response
    admitted = admission.admit(start - arrived)
    if admitted is None:
        metrics.shed("admission")
        if request.app[appkeys.SETTINGS].overload_response == "reject":
            raise Overloaded("admission")
        return (await _serve(request, parse(), start, arrived, admitted=False))[0]
    reason = None
    try:
        response, reason = await _serve(request, parse(), start, arrived, admitted=True)
        return response
    finally:
        admission.done(admitted, reason in (OVERLOADED, DEADLINE_REASON))


async def _serve(
    request: web.Request, req: RecommendRequest, start: float, arrived: float, admitted: bool
) -> tuple[web.Response, str | None]:
    """The answer, and its fallback reason."""
    settings = request.app[appkeys.SETTINGS]
    assignment = request.app[appkeys.EXPERIMENTS].current.assign(
        req.user_id, _flags(request, req.flags)
    )
    params = assignment.parameters
    query = Query(
        # The caller's X-Request-Id is for tracing; experiment attribution needs
        # an id that is unique for certain, so then the answer gets its own.
        request_id=os.urandom(8).hex() if request[FROM_CALLER] else request[REQUEST_ID],
        user_id=req.user_id,
        n=int(req.n) if req.n else settings.default_n,
        candidates=req.candidates,
        exclude=req.exclude,
        category=req.context.category if req.context else None,
        context=Context(req.context.device, req.context.page) if req.context else NO_CONTEXT,
        model=params.get("model"),
        strategy=params.get("strategy", "model"),
        candidate_config=_candidate_config(settings, params),
        experiments=assignment.variants,
        forced=assignment.forced,
        deadline=request[DEADLINE],
        arrived=arrived,
        queued=start - arrived,
        mark=(start, time.thread_time()),
        explain=req.explain,
        explain_top=int(req.explain_top),
    )
    recommender = request.app[appkeys.RECOMMENDER]
    if admitted:
        result = await recommender.recommend(query)
    else:
        result = recommender.overloaded(query)
    result.timer.mark("serialise")
    response = json_response(result.body(), headers={"Server-Timing": result.timer.header()})
    done = time.perf_counter()
    impressions = request.app[appkeys.IMPRESSIONS]
    if impressions.sampled():
        impressions.impression(
            entry(
                request_id=result.request_id,
                user_id=result.user_id,
                ts=time.time(),
                strategy=result.strategy,
                fallback_reason=result.fallback_reason,
                model=result.model,
                arm=result.arm,
                rollout=result.rollout,
                canary_share=result.canary_share,
                experiments=assignment.variants,
                weights=assignment.weights,
                forced=assignment.forced,
                items=[i["item_id"] for i in result.items],
                sources=[i["source"] for i in result.items],
                latency_ms=(done - arrived) * 1000.0,
                sample=impressions.sample,
            )
        )
    metrics.record_recommendation(
        result.strategy,
        result.fallback_reason,
        assignment.variants,
        result.timer.stages,
        done - start,
        result.arm,
    )
    request[SERVED] = {
        "recommendation_id": result.request_id,
        "user_id": result.user_id,
        "strategy": result.strategy,
        "fallback_reason": result.fallback_reason,
        "experiments": assignment.variants,
        "model_version": result.model["version"] if result.model else None,
        "arm": result.arm,
    }
    return response, result.fallback_reason


async def experiments_get(request: web.Request) -> web.Response:
    """The user's variants, without making a recommendation."""
    ref = convert_query({"user_id": request.match_info["user_id"]}, UserRef)
    assignment = request.app[appkeys.EXPERIMENTS].current.assign(ref.user_id)
    return json_response({"user_id": ref.user_id, "experiments": assignment.variants})


async def recommend_post(request: web.Request) -> web.Response:
    body = await request.read()  # already in: middleware.Guard waited for it
    return await _admitted(request, lambda: decode_json(body, RecommendRequest))


async def recommend_get(request: web.Request) -> web.Response:
    return await _admitted(request, lambda: _query_request(request))


def _query_request(request: web.Request) -> RecommendRequest:
    params: dict[str, Any] = dict(request.query)
    for name in ("candidates", "exclude"):
        if name in params:
            params[name] = [v for v in request.query.getall(name) for v in v.split(",") if v]
            if len(params[name]) > MAX_GET_IDS:
                raise InvalidRequest(f"at most {MAX_GET_IDS} ids in a query", field=name)
    context = {k: params.pop(k) for k in ("category", "device", "page") if k in params}
    if context:
        params["context"] = context
    return convert_query(params, RecommendRequest)


async def events_post(request: web.Request) -> web.Response:
    """One event or ``{"events": [...]}``; a bad event in a batch is listed, not fatal."""
    batch, events = decode_events(await request.read())
    result = await request.app[appkeys.INGESTOR].ingest(events)
    if not batch and result.rejected:  # a single event is valid or the request is bad
        first = result.rejected[0]
        if first["reason"] == "unknown_item":
            raise UnknownItem(first["error"])
        raise InvalidRequest(first["error"], field=first["field"])
    if not batch and result.failed:  # ... and applied, or the store is unavailable
        raise StoreUnavailable(result.failed[0]["error"])
    return json_response(result.body())


async def user_features_get(request: web.Request) -> web.Response:
    ref = convert_query({"user_id": request.match_info["user_id"]}, UserRef)
    body = await user_feature_values(request.app[appkeys.RECOMMENDER], ref.user_id)
    return json_response(body)


async def features_post(request: web.Request) -> web.StreamResponse:
    """Built and sent while holding the process's features gate (FeaturesGate):
    the answer's memory is released, and the next one built, only once this
    client has read it or run out of time."""
    req = decode_json(await request.read(), FeaturesRequest)
    max_cells = request.app[appkeys.SETTINGS].features_max_cells
    check_cells(req.user_ids, req.item_ids, max_cells)  # before waiting for the gate
    gate = request.app[appkeys.FEATURES_GATE]
    await gate.acquire()
    try:
        pieces = await feature_values_json(
            request.app[appkeys.RECOMMENDER], req.user_ids, req.item_ids, max_cells
        )
        response = web.StreamResponse(headers={REQUEST_ID_HEADER: request[REQUEST_ID]})
        response.content_type = "application/json"
        response.content_length = sum(len(p) for p in pieces)
        await response.prepare(request)
        try:
            async with asyncio.timeout(gate.send_secs):
                for piece in pieces:
                    await response.write(piece)  # waits while the client is behind
        except TimeoutError:
            # Part of the answer went out: nothing else may follow on this connection.
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the client did not read the answer in time") from None
        await response.write_eof()
        return response
    finally:
        gate.release()


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Whether this process should receive traffic.

    ready: Redis answers and the item data was loaded (a model, or the default
    strategy without one, serves).
    degraded (still 200): Redis does not answer but the default strategy serves
    from the in-process item data; taking every instance out of rotation during
    a Redis outage would turn a degraded service into none.
    not_ready (503): the item data was never loaded (not yet, or it could not
    be), whatever else works: every answer would be an empty list. A Redis
    that holds no items loads as empty and is ready: a new shop whose events
    create its items must get traffic to get items.
    """
    redis_ok = await request.app[appkeys.STORE].ping()
    model = request.app[appkeys.MODELS].current
    items_ready = request.app[appkeys.ITEMS].ready
    checks = {"redis": redis_ok, "model": model is not None, "default_strategy": items_ready}
    if redis_ok and items_ready:
        status = "ready"
    elif items_ready:
        status = "degraded"
    else:
        status = "not_ready"
    age = request.app[appkeys.ITEMS].age()
    body = {
        "status": status,
        "checks": checks,
        # Open: requests use the default strategy without trying Redis.
        "circuit": request.app[appkeys.STORE].breaker.state,
        "item_data_age_secs": round(age, 3) if age is not None else None,
        "model": (
            {"name": model.name, "version": model.version, "scorer": model.scorer.name}
            if model
            else None
        ),
    }
    return json_response(body, status=503 if status == "not_ready" else 200)


def _model_entry(model: LoadedModel) -> dict[str, Any]:
    metrics = model.meta.get("metrics", {})
    return {
        "name": model.name,
        "version": model.version,
        "created_at": model.meta.get("created_at"),
        "schema_hash": model.meta.get("schema_hash"),
        "scorer": model.scorer.name,
        "ndcg_at_10": metrics.get("ndcg_at_10"),
    }


# Admin handlers: the admin scope is checked before them (routes.py, middleware.Guard).


async def admin_models_get(request: web.Request) -> web.Response:
    """The models loaded now (stable and canary versions), the roll-out records
    this worker follows, and the versions refused (with why)."""
    registry = request.app[appkeys.MODELS]
    return json_response(
        {
            "default": registry.default,
            "models": [_model_entry(m) for _, m in sorted(registry.models.items())],
            "canaries": [_model_entry(m) for _, m in sorted(registry.canaries.items())],
            "rollouts": {name: r.body() for name, r in sorted(registry.rollouts.items())},
            "refused": [
                {"name": name, "version": version, "reason": reason}
                for (name, version), reason in sorted(registry.refused.items())
            ],
            # Records whose stable version this worker does not serve, and why.
            "unfollowed": registry.unfollowed(),
        }
    )


async def admin_models_reload(request: web.Request) -> web.Response:
    """Load every newer model version now. 200 when each model serves its newest
    version; 409 when a newest version was refused (the previous one keeps serving,
    and the answer says why)."""
    outcomes = await request.app[appkeys.MODELS].reload()
    refused = any(o.status == "refused" for o in outcomes)
    return json_response({"models": [o.body() for o in outcomes]}, status=409 if refused else 200)


async def admin_experiments_reload(request: web.Request) -> web.Response:
    """Load the experiments file again: 200 when it serves, 409 with the reason when
    refused (the old experiments keep serving)."""
    ok, message = request.app[appkeys.EXPERIMENTS].reload()
    return json_response({"loaded": ok, "message": message}, status=200 if ok else 409)


async def admin_items_put(request: web.Request) -> web.Response:
    """Create or update catalogue items (category, price). The first upsert marks
    the store as holding a catalogue: with RECSVC_UNKNOWN_ITEMS=auto, events for
    items outside it are refused from then on."""
    req = decode_json(await request.read(), CatalogueUpsert)
    await request.app[appkeys.STORE].upsert_items(
        [(i.item_id, i.category or "", i.price) for i in req.items]
    )
    return json_response({"upserted": len(req.items)})


async def admin_items_delete_many(request: web.Request) -> web.Response:
    """Delete up to 500 items in one call: every process reloads its items once
    for the lot (DELETE /admin/items/{id} reloads once per item)."""
    req = decode_json(await request.read(), CatalogueDelete)
    ids = list(dict.fromkeys(req.item_ids))
    done = await request.app[appkeys.STORE].delete_items(ids)
    return json_response(
        {
            "deleted": [i for i, d in zip(ids, done, strict=True) if d],
            "not_found": [i for i, d in zip(ids, done, strict=True) if not d],
        }
    )


async def admin_items_delete(request: web.Request) -> web.Response:
    """Delete an item: it is never served again (every process reloads the
    item's shard within RECSVC_ITEM_REFRESH_SECS); events naming it are then
    unknown items. 404 when no shard holds it."""
    ref = convert_query({"item_id": request.match_info["item_id"]}, ItemRef)
    (deleted,) = await request.app[appkeys.STORE].delete_items([ref.item_id])
    if not deleted:
        raise web.HTTPNotFound(reason=f"no item {ref.item_id!r}")
    return json_response({"item_id": ref.item_id, "deleted": True})


_DOCS_PAGE = resources.files("recsvc.web").joinpath("static", "docs.html").read_bytes()
_DEMO_PAGE = resources.files("recsvc.web").joinpath("static", "index.html").read_bytes()


async def openapi_get(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 contract (generated from the request types)."""
    return web.Response(body=request.app[appkeys.OPENAPI], content_type="application/json")


async def metrics_get(request: web.Request) -> web.Response:
    """Prometheus text exposition (every worker's counts with ``--workers N``)."""
    request.app[appkeys.METRICS_SAMPLER].sample()
    body = await asyncio.to_thread(metrics.exposition)  # reads files in multiprocess mode
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def index_get(request: web.Request) -> web.Response:
    """The live demo page: recommendations with explanations, events, live metrics."""
    return web.Response(body=_DEMO_PAGE, content_type="text/html", charset="utf-8")


async def docs_get(request: web.Request) -> web.Response:
    """A readable API page rendered from /openapi.json in the browser (no CDN)."""
    return web.Response(body=_DOCS_PAGE, content_type="text/html", charset="utf-8")
