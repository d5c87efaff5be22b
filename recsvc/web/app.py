"""Application factory: resources live in cleanup contexts (create, yield, close)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from recsvc.ab.canary import CanaryController
from recsvc.ab.experiments import ExperimentsHolder
from recsvc.ab.impressions import ImpressionLog
from recsvc.ab.rollout import RolloutStore, refuse_canary
from recsvc.ops import metrics
from recsvc.ops.looplag import LoopLag
from recsvc.ranking import scoring
from recsvc.ranking.models import ModelRegistry
from recsvc.service.admission import Admission
from recsvc.service.ingest import Ingestor
from recsvc.service.itemcache import ItemCache
from recsvc.service.online import FeaturesGate
from recsvc.service.recommend import Recommender
from recsvc.settings import Settings
from recsvc.store.client import REDIS_FAILURES, connect
from recsvc.store.feature_store import FeatureStore, IncompatibleStore
from recsvc.web import appkeys, openapi
from recsvc.web.access import Access
from recsvc.web.middleware import Guard, cors, observe
from recsvc.web.routes import setup_metrics_routes, setup_routes

log = logging.getLogger(__name__)


async def _load_ctx(app: web.Application) -> AsyncIterator[None]:
    """Event-loop lag and the admission limit of this process (recsvc.admission)."""
    settings = app[appkeys.SETTINGS]
    lag = app[appkeys.LOOP_LAG] = LoopLag(interval=0.005)
    lag.on_tick = metrics.LOOP_LAG.observe
    # The target never exceeds the request deadline (the settings table says so).
    target = min(settings.admission_target_ms, settings.request_deadline_ms) / 1000.0
    burst = (settings.admission_burst_ms or 0.9 * settings.request_deadline_ms) / 1000.0
    app[appkeys.ADMISSION] = Admission(target, settings.max_inflight, burst_target=burst)
    lag.start()
    yield
    lag.stop()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    client = connect(app[appkeys.REDIS_URL], settings)
    writer = connect(app[appkeys.REDIS_URL], settings, writes=True)
    reader = connect(app[appkeys.REDIS_URL], settings, request_path=True)
    app[appkeys.REDIS] = reader
    store = app[appkeys.STORE] = FeatureStore(client, settings, writer, reader)
    store.lag = app[appkeys.LOOP_LAG]
    try:
        async with asyncio.timeout(settings.redis_write_timeout_ms / 1000.0):
            await store.check_format()
            # The request-path client's first call discovers a cluster's slots
            # and opens a connection: here, not inside a request's deadline.
            await store.reader.ping()
    except IncompatibleStore:
        await store.aclose()
        raise  # serving another format's data would be wrong answers, not errors
    except REDIS_FAILURES as exc:
        log.warning("Redis unreachable at start (%s); serving the default strategy", exc)
    yield
    await store.aclose()


async def _cancel(task: asyncio.Task[None], every: float = 1.0) -> None:
    """Cancel a background task and wait for it to end, cancelling again every
    ``every`` seconds: a cancellation that lands while a Redis call times out
    can be turned into that call's error by the library and caught as one (a
    loop that retries Redis failures would then never end, and neither would
    the shutdown waiting for it)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _items_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = ItemCache(app[appkeys.STORE])
    app[appkeys.ITEMS] = cache
    try:
        await cache.refresh()
    except Exception as exc:  # serve anyway; the loop below keeps trying
        log.warning("initial item load failed: %s", type(exc).__name__)
    stop = asyncio.Event()
    task = asyncio.create_task(cache.run(app[appkeys.SETTINGS].item_refresh_secs, stop))
    yield
    stop.set()
    await task


async def _models_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    compiler = None
    if settings.scorer == "compiled":
        if scoring.available():
            compiler = scoring.Compiler(settings.data_dir / "cache" / "scorers")
        else:
            log.warning("lleaves is not installed; the native LightGBM scorer serves")
    items = app[appkeys.ITEMS]
    registry = ModelRegistry(settings.models_path, settings.model_name, compiler, items.bind_now)
    await asyncio.to_thread(registry.load_now)
    items.neighbours = registry.neighbour_tables
    if registry.current is None:
        log.warning("no usable model in %s; serving the default strategy", settings.models_path)
    registry.start_compiles()
    app[appkeys.MODELS] = registry
    task = asyncio.create_task(registry.poll(settings.model_poll_secs))
    yield
    await _cancel(task)
    await registry.close()


async def _follow_rollouts(registry: ModelRegistry, store: RolloutStore) -> None:
    """Serve what the roll-out records say (recsvc.ab.rollout); roll back a canary
    this worker cannot load."""
    records = await store.all()
    before = set(registry.rollouts)
    failed = await registry.follow(records, store.unparsed)
    for name, why in failed.items():
        version = records[name].canary
        assert version is not None
        await refuse_canary(store, name, version, why)
    for name, r in records.items():
        metrics.ROLLOUT_SHARE.labels(name).set(r.share if r.running else 0.0)
    unfollowed = registry.unfollowed()
    for name in set(records) | before:
        metrics.ROLLOUT_UNFOLLOWED.labels(name).set(1.0 if name in unfollowed else 0.0)


async def _rollouts_poll(
    registry: ModelRegistry,
    store: RolloutStore,
    interval: float,
    bound: float,
    stop: asyncio.Event,
) -> None:
    failing = False
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        try:
            async with asyncio.timeout(bound):  # a hung Redis: try again next time
                await _follow_rollouts(registry, store)
            failing = False
        except REDIS_FAILURES as exc:  # keep serving what we serve
            if not failing:
                log.warning("roll-out records unreadable; serving as before: %r", exc)
            failing = True
        except Exception:  # the poller must outlive any record
            log.exception("following the roll-outs failed; serving as before")


async def _rollouts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Roll-outs: follow the records before serving (when Redis answers), then
    poll them; and run this worker's canary controller (one acts at a time)."""
    settings, registry = app[appkeys.SETTINGS], app[appkeys.MODELS]
    client = app[appkeys.STORE].client
    store = app[appkeys.ROLLOUTS] = RolloutStore(client)
    try:
        async with asyncio.timeout(settings.redis_write_timeout_ms / 1000.0):
            await _follow_rollouts(registry, store)
    except REDIS_FAILURES as exc:
        log.warning("roll-out records unreadable at start (%s); newest versions serve", exc)
    except Exception:  # a record that does not parse must not stop every worker
        log.exception("roll-out records unusable at start; newest versions serve")
    bound = max(settings.redis_write_timeout_ms / 1000.0, 5.0)
    stop = asyncio.Event()
    poller = asyncio.create_task(
        _rollouts_poll(registry, store, settings.rollout_poll_secs, bound, stop)
    )
    controller = CanaryController(
        client,
        store,
        tick_secs=settings.canary_tick_secs,
        outcome_wait_secs=settings.canary_outcome_wait_secs,
    )
    running = asyncio.create_task(controller.run(stop))
    yield
    stop.set()
    await _cancel(running)
    await _cancel(poller)


async def _experiments_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    registry = app[appkeys.MODELS]
    holder = ExperimentsHolder(settings.experiments, lambda: set(registry.models))
    holder.load_now()  # a bad file at start stops the service, with the reason
    app[appkeys.EXPERIMENTS] = holder
    impressions = ImpressionLog(
        app[appkeys.STORE].writer,
        settings.exposure_stream_max,
        settings.impressions_sample,
        max_bytes=int(settings.impressions_max_mb * 1024 * 1024),
    )
    app[appkeys.IMPRESSIONS] = impressions
    stop = asyncio.Event()
    writer = asyncio.create_task(impressions.run(stop))
    poller = asyncio.create_task(holder.poll(settings.model_poll_secs))
    yield
    await _cancel(poller)
    stop.set()  # flush what is queued (bounded), then stop
    await writer


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    registry, store = app[appkeys.MODELS], app[appkeys.STORE]
    admission = app[appkeys.ADMISSION]
    sampler = metrics.GaugeSampler(
        app[appkeys.ITEMS].age,
        lambda: store.breaker.state,
        lambda: {
            (m.name, m.version, m.scorer.name)
            for m in [*registry.models.values(), *registry.canaries.values()]
        },
        lambda: (admission.limit, admission.estimate),
        lambda: app[appkeys.GUARD].inflight,
    )
    app[appkeys.METRICS_SAMPLER] = sampler
    task = asyncio.create_task(sampler.run(1.0))
    yield
    await _cancel(task)


async def _recommender_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    app[appkeys.INGESTOR] = Ingestor(
        app[appkeys.STORE], app[appkeys.ITEMS], app[appkeys.IMPRESSIONS]
    )
    app[appkeys.RECOMMENDER] = Recommender(
        app[appkeys.STORE],
        app[appkeys.ITEMS],
        app[appkeys.MODELS],
        settings.candidate_config,
        settings.exclude_seen,
        admission=app[appkeys.ADMISSION],
        lag=app[appkeys.LOOP_LAG],
    )
    yield


def create_app(settings: Settings, redis_url: str) -> web.Application:
    """The recsvc web application for one Redis URL."""
    access = Access(settings.keyring())
    guard = Guard(
        settings.max_inflight,
        settings.max_body_bytes,
        settings.body_timeout_ms,
        settings.request_deadline_ms,
        access,
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            observe(
                settings.request_log_sample,
                settings.request_log_slow_ms,
                settings.request_deadline_ms,
            ),
            cors(settings.cors_origin_list),
            guard.middleware,
        ],
    )
    app[appkeys.GUARD] = guard
    app[appkeys.FEATURES_GATE] = FeaturesGate()
    app[appkeys.ACCESS] = access
    app[appkeys.SETTINGS] = settings
    app[appkeys.REDIS_URL] = redis_url
    app[appkeys.OPENAPI] = openapi.text().encode()
    app.cleanup_ctx.extend(
        [
            _load_ctx,
            _redis_ctx,
            _items_ctx,
            _models_ctx,
            _rollouts_ctx,
            _experiments_ctx,
            _metrics_ctx,
            _recommender_ctx,
        ]
    )
    setup_routes(app)
    return app


def create_metrics_app(app: web.Application) -> web.Application:
    """The metrics listener's application (RECSVC_METRICS_PORT): /metrics of
    ``app``'s process (every worker's counts in multiprocess mode), no key.
    Call once ``app`` is set up (its metrics sampler exists)."""
    metrics_app = web.Application()
    metrics_app[appkeys.METRICS_SAMPLER] = app[appkeys.METRICS_SAMPLER]
    setup_metrics_routes(metrics_app)
    return metrics_app
