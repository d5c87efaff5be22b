"""Prometheus metrics (prometheus-client), correct with one process or ``--workers N``.

With several workers, ``recsvc serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an
emptied directory before the workers start (see :func:`prepare_multiprocess`);
each worker then writes its values to memory-mapped files there and a scrape,
answered by whichever worker the kernel picks, sums them all
(``MultiProcessCollector``). Gauges say how they combine across workers.

Everything here is a module-level metric: recording is a few microseconds and
never awaits, so it stays off the request's critical resources.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Chosen by prometheus-client when it is first imported; fixed for the process.
MULTIPROCESS = MULTIPROC_ENV in os.environ
# generate_latest writes the 0.0.4 text format (CONTENT_TYPE_LATEST names 1.0.0
# in newer prometheus-client releases).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Request latency: fine around the 10 ms aim and the 35 ms p99 target.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.035,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

HTTP_LATENCY = Histogram(
    "recsvc_http_request_duration_seconds",
    "HTTP request latency by route template, method and status.",
    ("route", "method", "status"),
    buckets=LATENCY_BUCKETS,
)
RECOMMENDATION_LATENCY = Histogram(
    "recsvc_recommendation_duration_seconds",
    "Recommendation latency by strategy (model, popular, fallback).",
    ("strategy",),
    buckets=LATENCY_BUCKETS,
)
VARIANT_LATENCY = Histogram(
    "recsvc_variant_recommendation_duration_seconds",
    "Recommendation latency per experiment variant and strategy (a request inside "
    "several experiments is counted in each; outside any, not at all).",
    ("experiment", "variant", "strategy"),
    buckets=LATENCY_BUCKETS,
)
ROLLOUT_LATENCY = Histogram(
    "recsvc_rollout_recommendation_duration_seconds",
    "Recommendation latency while a canary runs, by roll-out arm (canary, stable) and "
    "strategy: the count per arm and strategy is the answers and fallbacks per arm.",
    ("arm", "strategy"),
    buckets=LATENCY_BUCKETS,
)
ROLLOUT_SHARE = Gauge(
    "recsvc_rollout_canary_share",
    "Share of users a running canary serves, by model name (0 when none runs).",
    ("name",),
    multiprocess_mode="livemax",
)
ROLLOUT_UNFOLLOWED = Gauge(
    "recsvc_rollout_unfollowed",
    "1 while a worker cannot serve the stable version its roll-out record names "
    "(that version would not load; the version loaded before serves, which nobody "
    "promoted), by model name; 0 otherwise. Alert on it: GET /admin/models says why.",
    ("name",),
    multiprocess_mode="livemax",
)
STAGE_LATENCY = Histogram(
    "recsvc_stage_duration_seconds",
    "Time per stage of a recommendation: queue (arrival to handler), redis, cpu_wait "
    "(for the CPU section), candidates, features, score, fallback, serialise.",
    ("stage",),
    buckets=STAGE_BUCKETS,
)
FALLBACKS = Counter(
    "recsvc_fallbacks_total",
    "Recommendations answered by the default strategy, by reason.",
    ("reason",),
)
REDIS_ERRORS = Counter(
    "recsvc_redis_errors_total",
    "Failed Redis operations by operation (read, write, items) and error type.",
    ("operation", "error"),
)
CIRCUIT_STATE = Gauge(
    "recsvc_redis_circuit_state",
    "Redis circuit breaker: 0 closed, 1 half-open, 2 open (the worst live worker).",
    multiprocess_mode="livemax",
)
EVENTS = Counter(
    "recsvc_events_total",
    "Behaviour events by outcome: accepted, duplicate, rejected (invalid), unknown_item "
    "(refused by RECSVC_UNKNOWN_ITEMS), failed (Redis).",
    ("outcome",),
)
MODEL_LOADED = Gauge(
    "recsvc_model_loaded",
    "1 for each model version a live worker serves (name, version, scorer); 0 once replaced.",
    ("name", "version", "scorer"),
    multiprocess_mode="livemax",
)
ITEM_DATA_AGE = Gauge(
    "recsvc_item_data_age_seconds",
    "Age of the in-process item data (the oldest live worker's); +Inf before the first load.",
    multiprocess_mode="livemax",
)
INFLIGHT = Gauge(
    "recsvc_inflight_requests",
    "Requests being served (all live workers; sampled every second and at a scrape).",
    multiprocess_mode="livesum",
)
SHED = Counter(
    "recsvc_shed_requests_total",
    "Requests turned away at once by cause: admission (recommendations over the "
    "adaptive limit; 503, or the default strategy with overload_response=default) "
    "or max_inflight (the hard cap, every route; 503).",
    ("cause",),
)
LOOP_LAG = Histogram(
    "recsvc_event_loop_lag_seconds",
    "How late a timer due every 5 ms ran in each worker's event loop.",
    buckets=STAGE_BUCKETS,
)
POOL_WAIT = Histogram(
    "recsvc_redis_pool_wait_seconds",
    "Waits for a free Redis connection on the request path (only when one had to wait).",
    buckets=STAGE_BUCKETS,
)
ADMISSION_LIMIT = Gauge(
    "recsvc_admission_limit",
    "Recommendations that may be in flight now under the adaptive limit (all live workers).",
    multiprocess_mode="livesum",
)
ADMISSION_SERVICE = Gauge(
    "recsvc_admission_service_seconds",
    "Estimated cost of one recommendation in a busy worker (the slowest live worker's).",
    multiprocess_mode="livemax",
)
EXPOSURES_DROPPED = Counter(
    "recsvc_exposures_dropped_total",
    "Impression and outcome log entries dropped (queue full or Redis failing).",
)
IMPRESSION_LOG = Counter(
    "recsvc_impression_log_total",
    "Impression and outcome log entries by stream (impressions, outcomes) and result: "
    "written, queue_full (dropped: the writer was behind), redis_error (dropped: the "
    "write failed).",
    ("stream", "result"),
)

LOG_LINES_DROPPED = Counter(
    "recsvc_log_lines_dropped_total",
    "Log lines dropped because the log writer fell behind.",
)

API_REQUESTS = Counter(
    "recsvc_api_requests_total",
    "Requests let through by API key, by the key's name (never the key) and the route's scope.",
    ("key", "scope"),
)
AUTH_DENIED = Counter(
    "recsvc_auth_denied_total",
    "Requests refused by access control: missing (no bearer key; 401), invalid "
    "(not a configured key; 401), scope (a key without the route's scope; 403).",
    ("reason",),
)

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class GaugeSampler:
    """Sets the state gauges (item-data age, circuit, models served) from their
    sources: every second in the background, and just before a scrape.

    Model series are set to 0 rather than removed when replaced: in
    multiprocess mode a removed series would keep its last value in the file.
    """

    def __init__(
        self,
        age: Callable[[], float | None],
        circuit: Callable[[], str],
        models: Callable[[], set[tuple[str, str, str]]],
        admission: Callable[[], tuple[int, float]] | None = None,
        inflight: Callable[[], int] | None = None,
    ) -> None:
        self._age, self._circuit, self._models = age, circuit, models
        self._admission, self._inflight = admission, inflight
        self._shown: set[tuple[str, str, str]] = set()

    def sample(self) -> None:
        age = self._age()
        ITEM_DATA_AGE.set(math.inf if age is None else age)
        CIRCUIT_STATE.set(CIRCUIT_VALUES[self._circuit()])
        serving = self._models()
        for labels in self._shown - serving:
            MODEL_LOADED.labels(*labels).set(0)
        for labels in serving:  # again each time: a version can come back
            MODEL_LOADED.labels(*labels).set(1)
        self._shown |= serving
        if self._admission is not None:
            limit, service = self._admission()
            ADMISSION_LIMIT.set(limit)
            ADMISSION_SERVICE.set(service)
        if self._inflight is not None:
            INFLIGHT.set(self._inflight())

    async def run(self, interval: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)


def record_recommendation(
    strategy: str,
    reason: str | None,
    experiments: dict[str, str],
    stages: dict[str, float],
    elapsed: float,
    arm: str | None = None,
) -> None:
    """One answered recommendation: its latency, stage times and fallback reason
    (and its roll-out arm while a canary runs)."""
    _child(RECOMMENDATION_LATENCY, strategy).observe(elapsed)
    if arm is not None:
        _child(ROLLOUT_LATENCY, arm, strategy).observe(elapsed)
    for experiment, variant in experiments.items():
        _child(VARIANT_LATENCY, experiment, variant, strategy).observe(elapsed)
    for stage, secs in stages.items():
        _child(STAGE_LATENCY, stage).observe(secs)
    if reason is not None:
        _child(FALLBACKS, reason).inc()


_children: dict[tuple[object, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the lookup costs as much as the
    observation. Only for labels from bounded sets (routes, stages, reasons)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


SHED_CAUSES = ("admission", "max_inflight")


def shed(cause: str) -> None:
    _child(SHED, cause).inc()


for _cause in SHED_CAUSES:  # every cause in /metrics from the start, at 0
    _child(SHED, _cause)


IMPRESSION_STREAMS = ("impressions", "outcomes")
IMPRESSION_RESULTS = ("written", "queue_full", "redis_error")


def impression_log(stream: str, result: str, count: int = 1) -> None:
    _child(IMPRESSION_LOG, stream, result).inc(count)


for _stream in IMPRESSION_STREAMS:  # every series in /metrics from the start, at 0
    for _result in IMPRESSION_RESULTS:
        _child(IMPRESSION_LOG, _stream, _result)


DENIAL_REASONS = ("missing", "invalid", "scope")


def api_requests(key: str, scope: str) -> Any:
    """The request counter of one configured key name and scope (bounded: the
    keys are configured, not sent), to be incremented per request."""
    return _child(API_REQUESTS, key, scope)


def auth_denied(reason: str) -> None:
    _child(AUTH_DENIED, reason).inc()


for _reason in DENIAL_REASONS:
    _child(AUTH_DENIED, _reason)


def observe_http(route: str, method: str, status: int, elapsed: float) -> None:
    _child(HTTP_LATENCY, route, method, str(status)).observe(elapsed)


def prepare_multiprocess(directory: Path) -> None:
    """Remove the metric files in ``directory`` and point this process's children at it.

    Must run before the worker processes start: prometheus-client chooses its
    storage when first imported. Old files would add a previous run's counts.
    Only prometheus-client's ``*.db`` files are removed, never anything else.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.db"):
        old.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sums)."""
    if MULTIPROC_ENV in os.environ:
        _mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The text exposition of every metric (summed over workers in multiprocess mode)."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
